// SPDX-License-Identifier: GPL-2.0-only
/*
 * ringbuf_producer.bpf.c — fill a ring buffer from BPF_PROG_TEST_RUN, for the reader's tests and
 * benchmark (the host refuses tracing programs, XDP test runs work everywhere).
 *
 * Each run of `produce` puts `count` (<= 64) records of the trace watcher's layout in `ring`,
 * numbered by a global sequence in record.map_id (low 32 bits) and the key's first 8 bytes.
 * `mode` adds the cases a reader must handle: every third record discarded (BUSY cleared with
 * DISCARD set), or every fifth followed by a record of another size.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "trace.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} ring SEC(".maps");

enum { STAT_SUBMITTED = 0, STAT_DISCARDED = 1, STAT_DROPPED = 2, STAT_FOREIGN = 3, STAT_MAX };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

enum { MODE_PLAIN = 0, MODE_DISCARD = 1, MODE_FOREIGN = 2 };

struct params {
	__u32 count;
	__u32 mode;
	__u8 pad[8];
} __attribute__((packed));

struct foreign {
	__u64 seq;
	__u32 tag;
};

__u64 seq = 0;

static __always_inline void stat(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &slot);

	if (c)
		*c += 1; /* per-CPU slot, test runs do not nest */
}

SEC("xdp")
int produce(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct params *p = data;
	__u32 count, mode, i;

	if ((void *)(p + 1) > data_end)
		return XDP_ABORTED;
	count = p->count;
	mode = p->mode;
	for (i = 0; i < 64 && i < count; i++) {
		struct trace_record *rec = bpf_ringbuf_reserve(&ring, sizeof(*rec), 0);
		__u64 n = seq++;

		if (!rec) {
			stat(STAT_DROPPED);
			continue;
		}
		rec->map_id = (__u32)n;
		rec->key_len = 8;
		rec->value_len = 8;
		rec->op = 1;
		rec->flags = 0;
		rec->count = 1;
		rec->tgid = 0;
		*(__u64 *)rec->key = n;
		*(__u64 *)rec->value = ~n;
		if (mode == MODE_DISCARD && n % 3 == 0) {
			bpf_ringbuf_discard(rec, 0);
			stat(STAT_DISCARDED);
			continue;
		}
		bpf_ringbuf_submit(rec, 0);
		stat(STAT_SUBMITTED);
		if (mode == MODE_FOREIGN && n % 5 == 0) {
			struct foreign f = { .seq = n, .tag = 0xf0f0 };

			if (bpf_ringbuf_output(&ring, &f, sizeof(f), 0) == 0)
				stat(STAT_FOREIGN);
		}
	}
	return XDP_PASS;
}
