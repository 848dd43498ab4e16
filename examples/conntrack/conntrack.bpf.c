// SPDX-License-Identifier: GPL-2.0-only
/*
 * conntrack.bpf.c — a connection table in XDP: packets, bytes and last-seen time per IPv4 flow.
 * Every packet passes.
 *
 * Written the way data planes usually are: look the flow up and update it in place (atomic adds,
 * a store for last_seen); only a new flow goes through bpf_map_update_elem. With bpfsync's
 * in-place counters the agent folds the other nodes' packets and bytes into the same entries,
 * so a flow that moves to another node (ECMP rehash, failover) keeps its history there, and
 * last_seen is the latest packet on any node (policy `max`; CLOCK_TAI agrees across nodes).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "bpfsync.h"
#include "conntrack.h"

char LICENSE[] SEC("license") = "GPL";

#define ETH_P_IP 0x0800
#define IP_OFFSET 0x1fff

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow);
	__type(value, struct conn);
} conns SEC(".maps");

/* Fill key from an IPv4 packet; false for anything else. */
static __always_inline bool parse_flow(struct xdp_md *ctx, struct flow *key)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u16 *ports;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->version != 4)
		return false;
	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->proto = ip->protocol;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return true;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return true; /* later fragment: no L4 header */
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return false;
	ports = (void *)ip + ihl; /* TCP and UDP both start with source, destination port */
	if ((void *)(ports + 2) > data_end)
		return true;
	key->sport = ports[0];
	key->dport = ports[1];
	return true;
}

SEC("xdp")
int conntrack(struct xdp_md *ctx)
{
	__u64 len = (long)ctx->data_end - (long)ctx->data;
	__u64 now = bpfsync_now_ns();
	struct flow key = {};
	struct conn *c;

	if (!parse_flow(ctx, &key))
		return XDP_PASS;
	c = bpf_map_lookup_elem(&conns, &key);
	if (!c) {
		struct conn fresh = { .packets = 1, .bytes = len, .last_seen = now };

		if (bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST) == 0)
			return XDP_PASS;
		/* another CPU (or the agent) created it meanwhile: add to theirs */
		c = bpf_map_lookup_elem(&conns, &key);
		if (!c)
			return XDP_PASS; /* table full */
	}
	__sync_fetch_and_add(&c->packets, 1);
	__sync_fetch_and_add(&c->bytes, len);
	/* A plain store: CPUs racing here may leave a few ns older stamp; not worth a CAS loop. */
	*(volatile __u64 *)&c->last_seen = now;
	return XDP_PASS;
}
