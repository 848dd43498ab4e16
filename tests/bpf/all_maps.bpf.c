// SPDX-License-Identifier: GPL-2.0-only
/*
 * all_maps.bpf.c — one map of each type bpfsync syncs, all with BTF-typed keys and struct values,
 * for the map, BTF and poll tests. The program only keeps the maps referenced.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

enum verdict { V_ALLOW = 1, V_DENY = -2 };

struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct stats {
	__u64 packets;
	__u64 bytes;
	__s32 delta;
	__u16 ports[3];
	char label[6];
	__u8 mac[6];
	enum verdict verdict;
	struct {
		__u32 lo;
		__s64 hi;
	} window;
	union {
		__u32 as_u32;
		__u8 as_bytes[4];
	} tag;
	unsigned int flag_a : 1, flag_b : 3;
	bool seen;
};

typedef struct stats stats_t;

/* LPM trie keys (struct bpf_lpm_trie_key's shape): a prefix length, then the address */
struct lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct lpm_dev_v4 { /* more than a prefix: the interface's bits come first */
	__u32 prefixlen;
	__u32 ifindex;
	__u8 addr[4];
};

#define MAP(NAME, TYPE, KEY, MAX)			\
	struct {					\
		__uint(type, TYPE);			\
		__uint(max_entries, MAX);		\
		__type(key, KEY);			\
		__type(value, stats_t);			\
	} NAME SEC(".maps")

MAP(t_hash, BPF_MAP_TYPE_HASH, struct flow_key, 200000);
MAP(t_lru_hash, BPF_MAP_TYPE_LRU_HASH, struct flow_key, 4096);
MAP(t_pcpu_hash, BPF_MAP_TYPE_PERCPU_HASH, struct flow_key, 4096);
MAP(t_lru_pcpu, BPF_MAP_TYPE_LRU_PERCPU_HASH, struct flow_key, 4096);
MAP(t_array, BPF_MAP_TYPE_ARRAY, __u32, 1024);
MAP(t_pcpu_array, BPF_MAP_TYPE_PERCPU_ARRAY, __u32, 64);

#define LPM_MAP(NAME, KEY)					\
	struct {						\
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);		\
		__uint(max_entries, 1024);			\
		__uint(map_flags, BPF_F_NO_PREALLOC);		\
		__type(key, KEY);				\
		__type(value, stats_t);				\
	} NAME SEC(".maps")

LPM_MAP(t_lpm, struct lpm_v4);
LPM_MAP(t_lpm6, struct lpm_v6);
LPM_MAP(t_lpm_dev, struct lpm_dev_v4);

SEC("xdp")
int touch_maps(struct xdp_md *ctx)
{
	struct flow_key fk = {};
	struct lpm_v4 v4 = {};
	struct lpm_v6 v6 = {};
	struct lpm_dev_v4 dev = {};
	__u32 idx = 0;

	if (bpf_map_lookup_elem(&t_hash, &fk) || bpf_map_lookup_elem(&t_lru_hash, &fk) ||
	    bpf_map_lookup_elem(&t_pcpu_hash, &fk) || bpf_map_lookup_elem(&t_lru_pcpu, &fk) ||
	    bpf_map_lookup_elem(&t_array, &idx) || bpf_map_lookup_elem(&t_pcpu_array, &idx) ||
	    bpf_map_lookup_elem(&t_lpm, &v4) || bpf_map_lookup_elem(&t_lpm6, &v6) ||
	    bpf_map_lookup_elem(&t_lpm_dev, &dev))
		return XDP_PASS;
	return XDP_PASS;
}
