// SPDX-License-Identifier: GPL-2.0-only
/*
 * lpm_blocklist.bpf.c — drop IPv4 packets whose source address lies in a blocked prefix, in XDP.
 *
 * examples/blocklist with prefixes instead of single addresses: the blocklist is an LPM trie
 * written from user space on any one node (198.51.100.0/24), which bpfsync replicates
 * last-writer-wins to every node, deletes included. The program only reads the trie: a lookup
 * with the full 32-bit source address finds the longest blocked prefix holding it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lpm_blocklist.h"

char LICENSE[] SEC("license") = "GPL";

#define ETH_P_IP 0x0800

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* the kernel refuses an LPM trie without it */
	__type(key, struct lpm_v4_key);
	__type(value, __u64);
} lpm_blocklist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lpm_stats);
} lpm_stats SEC(".maps");

SEC("xdp")
int lpm_blocklist_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct lpm_v4_key key = { .prefixlen = 32 };
	struct lpm_stats *st;
	__u32 zero = 0;
	int action;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	__builtin_memcpy(key.addr, &ip->saddr, sizeof(key.addr));
	action = bpf_map_lookup_elem(&lpm_blocklist, &key) ? XDP_DROP : XDP_PASS;
	st = bpf_map_lookup_elem(&lpm_stats, &zero);
	if (st) {
		if (action == XDP_DROP)
			__sync_fetch_and_add(&st->dropped, 1);
		else
			__sync_fetch_and_add(&st->passed, 1);
	}
	return action;
}
