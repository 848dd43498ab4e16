/* SPDX-License-Identifier: Apache-2.0 */
/*
 * blocklist.h — the records blocklist.bpf.c shares with user space. Fixed sizes, no implicit
 * padding.
 */
#ifndef BLOCKLIST_H
#define BLOCKLIST_H

/* blocklist: key __u32 IPv4 source address (network byte order). */
struct block {
	__u64 added_ns;	/* CLOCK_TAI when it was blocked (informational) */
	__u32 reason;	/* free for the operator: a ticket, a rule id */
	__u32 pad;
};

/* bl_stats[0]: IPv4 packets this node saw, by verdict. */
struct bl_stats {
	__u64 passed;
	__u64 dropped;
};

#endif /* BLOCKLIST_H */
