// SPDX-License-Identifier: GPL-2.0-only
/*
 * probe_fexit.bpf.c — the smallest fexit program on a map-update function.
 *
 * bpfsync.kernel.features loads and attaches it to learn whether this kernel lets us trace map
 * writes at all (some kernels refuse fentry/fexit at BPF_PROG_LOAD by policy).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("fexit/htab_map_update_elem")
int probe(void *ctx)
{
	return 0;
}
