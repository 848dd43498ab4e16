/* SPDX-License-Identifier: Apache-2.0 */
/*
 * conntrack.h — the records conntrack.bpf.c shares with user space. Fixed sizes, no implicit
 * padding: the key is hashed byte for byte, so its pad must be zero.
 */
#ifndef CONNTRACK_H
#define CONNTRACK_H

/* conns key: one direction of a flow. Addresses and ports in network byte order; ports are 0
 * for protocols without them and for non-first fragments. */
struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct conn {
	__u64 packets;		/* policy `counter` */
	__u64 bytes;		/* policy `counter`: frame bytes as XDP sees them (no FCS) */
	__u64 last_seen;	/* CLOCK_TAI ns of the latest packet: policy `max` */
};

#endif /* CONNTRACK_H */
