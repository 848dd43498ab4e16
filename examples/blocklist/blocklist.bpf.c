// SPDX-License-Identifier: GPL-2.0-only
/*
 * blocklist.bpf.c — drop IPv4 packets from blocked source addresses, in XDP.
 *
 * The blocklist is written from user space (an operator, a detector) on any one node; bpfsync
 * replicates it last-writer-wins to every node, deletes included, so an address blocked anywhere
 * is dropped everywhere. The program only reads the map.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "blocklist.h"

char LICENSE[] SEC("license") = "GPL";

#define ETH_P_IP 0x0800

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct block);
} blocklist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bl_stats);
} bl_stats SEC(".maps");

SEC("xdp")
int blocklist_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct bl_stats *st;
	__u32 src, zero = 0;
	int action;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	src = ip->saddr;
	action = bpf_map_lookup_elem(&blocklist, &src) ? XDP_DROP : XDP_PASS;
	st = bpf_map_lookup_elem(&bl_stats, &zero);
	if (st) {
		if (action == XDP_DROP)
			__sync_fetch_and_add(&st->dropped, 1);
		else
			__sync_fetch_and_add(&st->passed, 1);
	}
	return action;
}
