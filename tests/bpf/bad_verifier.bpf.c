// SPDX-License-Identifier: GPL-2.0-only
/*
 * bad_verifier.bpf.c — deliberately rejected by the verifier: reads packet data without checking
 * it against data_end. The tests expect VerifierError with this complaint in its log. The second
 * program is fine; it loads once the first is switched off with set_autoload(false).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("xdp")
int unchecked_read(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;

	return data[20] == 0x45 ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int pass_all(struct xdp_md *ctx)
{
	return XDP_PASS;
}
