// SPDX-License-Identifier: GPL-2.0-only
/*
 * percpu_blocklist.bpf.c — the layout of stock XDP firewalls' blocklists, for the tests.
 *
 * Per-CPU hash maps keyed by source address (a __u32 IPv4 address, or 16 bytes of IPv6, in
 * network order), each value one __u64: flag bits below PCB_HIT_SHIFT, written by user space into
 * every CPU's slot, and a hit counter above, which this program counts in place in its CPU's slot
 * after the lookup (no atomics: a per-CPU slot has one writer). A source whose PCB_DROP flag is
 * set is dropped; pcb_stats counts this node's verdicts.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define PCB_DROP 0x1ULL
#define PCB_HIT_SHIFT 8

struct addr6 {
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} pcb_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr6);
	__type(value, __u64);
} pcb_v6 SEC(".maps");

struct pcb_stats {
	__u64 passed;
	__u64 dropped;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pcb_stats);
} pcb_stats SEC(".maps");

static __always_inline int verdict(__u64 *value)
{
	if (!value || !(*value & PCB_DROP))
		return XDP_PASS;
	*value += 1ULL << PCB_HIT_SHIFT;
	return XDP_DROP;
}

SEC("xdp")
int pcb_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct pcb_stats *st;
	__u32 zero = 0;
	int action = XDP_PASS;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 src;

		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		src = ip->saddr;
		action = verdict(bpf_map_lookup_elem(&pcb_v4, &src));
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct addr6 src;

		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		__builtin_memcpy(src.addr, &ip6->saddr, sizeof(src.addr));
		action = verdict(bpf_map_lookup_elem(&pcb_v6, &src));
	} else {
		return XDP_PASS;
	}
	st = bpf_map_lookup_elem(&pcb_stats, &zero);
	if (st) {
		if (action == XDP_DROP)
			__sync_fetch_and_add(&st->dropped, 1);
		else
			__sync_fetch_and_add(&st->passed, 1);
	}
	return action;
}
