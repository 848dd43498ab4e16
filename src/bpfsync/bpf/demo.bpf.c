// SPDX-License-Identifier: GPL-2.0-only
/*
 * demo.bpf.c — the map `make demo` and the cluster tests sync, and a program that writes it.
 *
 * Each node loads its own copy of this object and pins `sessions` under its own directory; the
 * agents sync the maps by name. `write_op` lets a test or the demo make writes *from BPF*: run it
 * with BPF_PROG_TEST_RUN and a struct demo_op as the packet. `write_range` makes up to
 * DEMO_RANGE_MAX writes a run, for a writer that offers more than a Python loop of runs can
 * (bench/run.py: 250k writes/s from BPF; one run a write managed ~100k).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct session {
	__u64 bytes;
	__u32 backend;
	__u16 port;
	__u8 proto;
	__u8 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct session);
} sessions SEC(".maps");

enum { DEMO_UPDATE = 1, DEMO_DELETE = 2 };

struct demo_op {
	__u32 op;
	__u32 key;
	struct session value;
} __attribute__((packed));

SEC("xdp")
int write_op(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct demo_op *cmd = data;
	struct session value;
	__u32 key;
	long err = -1;

	if ((void *)(cmd + 1) > data_end)
		return XDP_ABORTED;
	key = cmd->key;
	__builtin_memcpy(&value, &cmd->value, sizeof(value));
	if (cmd->op == DEMO_UPDATE)
		err = bpf_map_update_elem(&sessions, &key, &value, BPF_ANY);
	else if (cmd->op == DEMO_DELETE)
		err = bpf_map_delete_elem(&sessions, &key);
	return err ? XDP_ABORTED : XDP_PASS;
}

#define DEMO_RANGE_MAX 256

/* Key i (0 <= i < count) of the range is (first + i) % modulus; its value {bytes = base + i}. */
struct demo_range {
	__u32 first;
	__u32 count;
	__u32 modulus;
	__u32 pad;
	__u64 base;
} __attribute__((packed));

SEC("xdp")
int write_range(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct demo_range *cmd = data;
	struct session value = {};
	__u32 i, key;

	if ((void *)(cmd + 1) > data_end)
		return XDP_ABORTED;
	if (cmd->count > DEMO_RANGE_MAX || cmd->modulus == 0)
		return XDP_ABORTED;
	for (i = 0; i < DEMO_RANGE_MAX && i < cmd->count; i++) {
		key = (cmd->first + i) % cmd->modulus;
		value.bytes = cmd->base + i;
		if (bpf_map_update_elem(&sessions, &key, &value, BPF_ANY))
			return XDP_ABORTED;
	}
	return XDP_PASS;
}
