// SPDX-License-Identifier: GPL-2.0-only
/*
 * map_ops.bpf.c — update and delete a hash map from BPF, driven by BPF_PROG_TEST_RUN.
 *
 * The "packet" is a command: struct map_op below, padded to the 14 bytes XDP test runs require.
 * Returns XDP_PASS (2) when the helper succeeded, XDP_ABORTED (0) when it failed.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

enum { MAP_OP_UPDATE = 1, MAP_OP_DELETE = 2 };

struct map_op {
	__u32 op;
	__u32 key;
	__u64 value;
} __attribute__((packed));

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} bpf_written SEC(".maps");

SEC("xdp")
int apply_op(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct map_op *cmd = data;
	__u32 key;
	__u64 value;
	long err = -1;

	if ((void *)(cmd + 1) > data_end)
		return XDP_ABORTED;
	key = cmd->key;
	value = cmd->value;
	if (cmd->op == MAP_OP_UPDATE)
		err = bpf_map_update_elem(&bpf_written, &key, &value, BPF_ANY);
	else if (cmd->op == MAP_OP_DELETE)
		err = bpf_map_delete_elem(&bpf_written, &key);
	return err ? XDP_ABORTED : XDP_PASS;
}
