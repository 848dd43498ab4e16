// SPDX-License-Identifier: GPL-2.0-only
/*
 * trace_writer.bpf.c — maps of every traced type, written by BPF programs, for the trace tests.
 *
 * `apply` takes a command as its "packet" (BPF_PROG_TEST_RUN) and updates or deletes one key of
 * one map (of w_lpm: the prefix `prefixlen` bits of `key`); it returns the helper's error as a
 * positive errno (0: success), so a test can check that a failed op really failed. `burst` updates the next key of w_hash on every run: run it
 * with a large repeat to overflow the tracer's ring. `on_lo` is an XDP program for the loopback
 * device: every packet that reaches it is recorded in w_hash from softirq, on behalf of
 * whichever task sent the packet, then dropped (so no ICMP reply comes back through it).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct val {
	__u64 a;
	__u64 b;
};

/* Room to spare: an LRU map evicts long before it is full when it has fewer free elements than
 * its per-CPU refill target (128), and a test must not lose its keys to that. */
#define WRITER_ENTRIES 1024

#define WRITER_MAP(name, map_type)                                                           \
	struct {                                                                             \
		__uint(type, map_type);                                                      \
		__uint(max_entries, WRITER_ENTRIES);                                         \
		__type(key, __u32);                                                          \
		__type(value, struct val);                                                   \
	} name SEC(".maps")

WRITER_MAP(w_hash, BPF_MAP_TYPE_HASH);
WRITER_MAP(w_lru, BPF_MAP_TYPE_LRU_HASH);
WRITER_MAP(w_pcpu, BPF_MAP_TYPE_PERCPU_HASH);
WRITER_MAP(w_lru_pcpu, BPF_MAP_TYPE_LRU_PERCPU_HASH);
WRITER_MAP(w_array, BPF_MAP_TYPE_ARRAY);
WRITER_MAP(w_pcpu_array, BPF_MAP_TYPE_PERCPU_ARRAY);

/* struct bpf_lpm_trie_key's shape for IPv4 */
struct lpm_key {
	__u32 prefixlen;
	__u32 addr; /* network byte order */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WRITER_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required of LPM tries */
	__type(key, struct lpm_key);
	__type(value, struct val);
} w_lpm SEC(".maps");

/* Big enough for any burst a test makes; longer runs (the benchmark) overwrite keys. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct val);
} w_burst SEC(".maps");

enum { WRITER_UPDATE = 1, WRITER_DELETE = 2 };

struct cmd {
	__u8 map; /* index in the order of the maps above */
	__u8 op;
	__u16 prefixlen; /* w_lpm only: the key is this many leading bits of `key` */
	__u32 key;
	__u64 flags; /* BPF_ANY / BPF_NOEXIST / BPF_EXIST */
	struct val val;
} __attribute__((packed));

static __always_inline long apply_to(void *map, struct cmd *c, __u32 key, struct val *v)
{
	if (c->op == WRITER_UPDATE)
		return bpf_map_update_elem(map, &key, v, c->flags);
	if (c->op == WRITER_DELETE)
		return bpf_map_delete_elem(map, &key);
	return -22; /* EINVAL */
}

static __always_inline long apply_lpm(struct cmd *c, struct val *v)
{
	struct lpm_key key = { .prefixlen = c->prefixlen, .addr = c->key };

	if (c->op == WRITER_UPDATE)
		return bpf_map_update_elem(&w_lpm, &key, v, c->flags);
	if (c->op == WRITER_DELETE)
		return bpf_map_delete_elem(&w_lpm, &key);
	return -22; /* EINVAL */
}

SEC("xdp")
int apply(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct cmd *c = data;
	struct val v;
	__u32 key;
	long err;

	if ((void *)(c + 1) > data_end)
		return 22;
	key = c->key;
	v = c->val;
	switch (c->map) {
	case 0: err = apply_to(&w_hash, c, key, &v); break;
	case 1: err = apply_to(&w_lru, c, key, &v); break;
	case 2: err = apply_to(&w_pcpu, c, key, &v); break;
	case 3: err = apply_to(&w_lru_pcpu, c, key, &v); break;
	case 4: err = apply_to(&w_array, c, key, &v); break;
	case 5: err = apply_to(&w_pcpu_array, c, key, &v); break;
	case 6: err = apply_lpm(c, &v); break;
	default: err = -22;
	}
	return -err;
}

__u32 burst_next = 0;

SEC("xdp")
int burst(struct xdp_md *ctx)
{
	/* a test run executes on one CPU at a time; keys cycle through the map's 65536 */
	__u32 key = burst_next++ & 0xffff;
	struct val v = { .a = key, .b = ~(__u64)key };

	return bpf_map_update_elem(&w_burst, &key, &v, BPF_ANY) ? 1 : 0;
}

__u32 lo_seen = 0;

SEC("xdp")
int on_lo(struct xdp_md *ctx)
{
	__u32 key = lo_seen++ & 63; /* racy across CPUs: fine, keys only spread */
	struct val v = { .a = 0x10, .b = key };

	bpf_map_update_elem(&w_hash, &key, &v, BPF_ANY);
	return XDP_DROP;
}
