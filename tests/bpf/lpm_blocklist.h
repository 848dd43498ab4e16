/* SPDX-License-Identifier: Apache-2.0 */
/*
 * lpm_blocklist.h — the records lpm_blocklist.bpf.c shares with user space. Fixed sizes, no
 * implicit padding.
 */
#ifndef LPM_BLOCKLIST_H
#define LPM_BLOCKLIST_H

/* lpm_blocklist key: struct bpf_lpm_trie_key's shape for IPv4. Value: __u64 CLOCK_TAI ns when
 * the prefix was blocked (informational). */
struct lpm_v4_key {
	__u32 prefixlen; /* bits of addr that count, 0-32 */
	__u8 addr[4];    /* network byte order, as in the packet */
};

/* lpm_stats[0]: IPv4 packets this node saw, by verdict (examples/blocklist's struct bl_stats). */
struct lpm_stats {
	__u64 passed;
	__u64 dropped;
};

#endif /* LPM_BLOCKLIST_H */
