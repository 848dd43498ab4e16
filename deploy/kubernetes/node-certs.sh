#!/bin/sh
# Certificates for the DaemonSet, in the layout daemonset.yaml mounts from the Secret bpfsync-tls:
# ca.pem, and NODE.pem and NODE.key for every node, NODE being the node's name (its node id).
#
#   node-certs.sh CA_DIR OUT_DIR NODE...
#   node-certs.sh ./ca ./tls $(kubectl get nodes -o jsonpath='{.items[*].metadata.name}')
#   kubectl -n bpfsync create secret generic bpfsync-tls --from-file=./tls
#
# CA_DIR holds the cluster's bpfsync CA (ca.pem, ca.key); it is made if missing. Keep ca.key off
# the cluster. Each certificate names its node (common name and DNS name) and bpfsync-peers,
# the tls.server_name of bpfsync.yaml. Nodes that already have files in OUT_DIR keep them, so
# running it again with every node's name issues only the new nodes' certificates; delete a
# node's two files to issue it a new one. BPFSYNC: the bpfsync command (default: bpfsync);
# DAYS: validity of new node certificates (default 365).
set -eu
if [ "$#" -lt 3 ]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
ca_dir=$1
out=$2
shift 2
bpfsync=${BPFSYNC:-bpfsync}
if [ ! -f "$ca_dir/ca.pem" ]; then
    $bpfsync certs ca --out "$ca_dir" >/dev/null
fi
mkdir -p "$out"
for node in "$@"; do
    if [ "$node" = ca ]; then
        echo "node-certs.sh: a node named 'ca' would overwrite ca.pem in $out" >&2
        exit 2
    fi
    if [ -f "$out/$node.pem" ] && [ -f "$out/$node.key" ]; then
        continue
    fi
    $bpfsync certs node "$node" --ca-dir "$ca_dir" --dns bpfsync-peers --days "${DAYS:-365}" \
        --out "$out" --force >/dev/null
    echo "issued $out/$node.pem"
done
cp "$ca_dir/ca.pem" "$out/ca.pem"
