// SPDX-License-Identifier: GPL-2.0-only
/*
 * xdp_count.bpf.c — count IPv4 packets and bytes per source address, the way data planes do:
 * look the key up and add through the returned pointer (an in-place write no map-update hook
 * sees); only a new source goes through bpf_map_update_elem. Every packet passes.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define ETH_P_IP 0x0800

struct src_stats {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);	/* IPv4 source address, network byte order */
	__type(value, struct src_stats);
} src_counts SEC(".maps");

SEC("xdp")
int count_sources(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	__u64 len = data_end - data;
	struct src_stats *st, init = { .packets = 1, .bytes = len };
	__u32 src;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	src = ip->saddr;
	st = bpf_map_lookup_elem(&src_counts, &src);
	if (st) {
		__sync_fetch_and_add(&st->packets, 1);
		__sync_fetch_and_add(&st->bytes, len);
	} else {
		bpf_map_update_elem(&src_counts, &src, &init, BPF_NOEXIST);
	}
	return XDP_PASS;
}
