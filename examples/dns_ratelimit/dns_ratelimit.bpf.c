// SPDX-License-Identifier: GPL-2.0-only
/*
 * dns_ratelimit.bpf.c — a cluster-wide rate limit on DNS queries (UDP to port 53), per IPv4
 * source address and fixed time window, enforced in XDP on every node.
 *
 * Each node counts the queries it admits in its own entry of rl_counts {window, count}; the
 * bpfsync agent never writes that map (`counters: exact`). It writes the other nodes' merged
 * entry for the same source into rl_peers, and a query is dropped once own + peers' count in the
 * current window reaches the limit. Windows are numbered from CLOCK_TAI, so every node agrees on
 * the window number, and the agent's `epoch` policy on `window` lets a new window start from 0.
 *
 * Only admitted queries count: a flood that is being dropped does not push the count (and the
 * traffic between agents) further. Anything that is not an IPv4 UDP query to port 53 passes
 * untouched, and so do queries when rl_counts is full (fail open).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "bpfsync.h"
#include "dns_ratelimit.h"

char LICENSE[] SEC("license") = "GPL";

#define ETH_P_IP 0x0800
#define IP_OFFSET 0x1fff /* fragment offset bits of frag_off */
#define DNS_PORT 53

#ifndef RL_LIMIT
#define RL_LIMIT 100
#endif
#ifndef RL_WINDOW_NS
#define RL_WINDOW_NS 1000000000ULL
#endif

/* Set by the loader before load (bpf_map__set_initial_value on .rodata, or a skeleton). */
const volatile struct rl_config rl_config = {
	.limit = RL_LIMIT,
	.window_ns = RL_WINDOW_NS,
};

/* This node's own count per source; written only here, shipped by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct rl_value);
} rl_counts SEC(".maps");

/* The other nodes' merged entry per source; written only by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct rl_value);
} rl_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rl_stats);
} rl_stats SEC(".maps");

static __always_inline int verdict(int action)
{
	__u32 zero = 0;
	struct rl_stats *st = bpf_map_lookup_elem(&rl_stats, &zero);

	if (st) {
		if (action == XDP_DROP)
			__sync_fetch_and_add(&st->dropped, 1);
		else
			__sync_fetch_and_add(&st->passed, 1);
	}
	return action;
}

/* The source of an IPv4 UDP datagram to port 53, or 0 if the packet is anything else. */
static __always_inline __u32 dns_query_source(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	if (ip->version != 4 || ip->protocol != IPPROTO_UDP)
		return 0;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return 0; /* a later fragment: no UDP header (the first fragment was counted) */
	ihl = ip->ihl * 4; /* options are skipped, whatever they are */
	if (ihl < sizeof(*ip))
		return 0;
	udp = (void *)ip + ihl;
	if ((void *)(udp + 1) > data_end || udp->dest != bpf_htons(DNS_PORT))
		return 0;
	return ip->saddr;
}

SEC("xdp")
int dns_ratelimit(struct xdp_md *ctx)
{
	struct rl_value *own;
	__u64 window, total;
	__u32 src;

	src = dns_query_source(ctx);
	if (!src)
		return XDP_PASS;
	window = bpfsync_window(rl_config.window_ns);
	own = bpf_map_lookup_elem(&rl_counts, &src);
	if (!own) {
		struct rl_value fresh = { .window = window, .count = 0 };

		/* -EEXIST when another CPU created it first: fine, use theirs */
		bpf_map_update_elem(&rl_counts, &src, &fresh, BPF_NOEXIST);
		own = bpf_map_lookup_elem(&rl_counts, &src);
		if (!own)
			return verdict(XDP_PASS); /* map full: fail open */
	}
	if (BPFSYNC_READ(own->window) != window) {
		/* A new window starts from 0. The count is cleared before the window moves, so a CPU
		 * that already sees the new window never sees the old count; an increment racing
		 * with the reset may be lost (an undercount of a packet or two, once per window).
		 * No cmpxchg: it needs -mcpu=v3 and would only narrow that race. */
		*(volatile __u64 *)&own->count = 0;
		*(volatile __u64 *)&own->window = window;
	}
	total = BPFSYNC_COUNTER_TOTAL_EPOCH(&rl_peers, &src, own, struct rl_value, count, window);
	if (total >= rl_config.limit)
		return verdict(XDP_DROP);
	__sync_fetch_and_add(&own->count, 1);
	return verdict(XDP_PASS);
}
