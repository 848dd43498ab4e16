/* SPDX-License-Identifier: Apache-2.0 */
/*
 * dns_ratelimit.h — the records dns_ratelimit.bpf.c shares with user space (the loader, the
 * agent through BTF, tests). Fixed sizes, no implicit padding, little-endian on x86.
 */
#ifndef DNS_RATELIMIT_H
#define DNS_RATELIMIT_H

/* rl_counts and rl_peers: key __u32 IPv4 source address (network byte order). */
struct rl_value {
	__u64 window;	/* bpfsync_window(window_ns): merged with policy `epoch` */
	__u64 count;	/* queries admitted in that window: policy `counter` */
};

/* rl_stats[0]: every DNS query this node saw, by verdict. */
struct rl_stats {
	__u64 passed;
	__u64 dropped;
};

/* The .rodata constants, set by the loader before load (defaults in the .bpf.c). */
struct rl_config {
	__u64 limit;		/* queries per source per window, cluster-wide */
	__u64 window_ns;	/* window length */
};

#endif /* DNS_RATELIMIT_H */
