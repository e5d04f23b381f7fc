#!/usr/bin/env bash
# Creates podiam's mutual-TLS pair without cert-manager: a CA, a server certificate for
# the podiam-server Service and a client certificate for the agents (ECDSA P-256), and
# stores them as the Secrets podiam-server-tls and podiam-agent-tls (ca.crt, tls.crt,
# tls.key), as deploy/base expects. The binaries reload rotated files by themselves: to
# rotate, rerun it before --days runs out (new certificates from the same CA). --new-ca
# makes a new CA, trusted next to the old one; rerun once more after every pod has
# reloaded to drop the old one. With components/pod-identity applied, it also sets the
# admission webhook's caBundle (rerun it once after the first apply).
#
#   deploy/gen-certs.sh                    # into the cluster of the current kubectl context
#   deploy/gen-certs.sh --out DIR          # only write the files
#   options: --namespace NS (podiam)  --days N (90)  --ca-days N (3650)  --new-ca  --help
set -euo pipefail

namespace=podiam
days=90
ca_days=3650
out=
keep_ca=1
while [ $# -gt 0 ]; do
  case $1 in
    --namespace) namespace=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --ca-days) ca_days=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --rotate)
      echo "gen-certs.sh: --rotate is gone: rerunning rotates the certificates (same CA); --new-ca makes a new CA" >&2
      exit 2 ;;
    --new-ca) keep_ca=0; shift ;;
    *) echo "gen-certs.sh: unknown option $1 (see the header of this script)" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl is required" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077
dir=${out:-$work}
mkdir -p "$dir"

# openssl's own messages only when it fails.
ssl() {
  if ! openssl "$@" 2>"$work/openssl.err"; then
    echo "gen-certs.sh: openssl $1 failed:" >&2
    cat "$work/openssl.err" >&2
    exit 1
  fi
}
new_ca() {
  ssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$ca_days" -subj "/CN=podiam CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}

# The CA already in the cluster is reused (rotation), unless told otherwise; a new one is
# trusted next to the old one until every pod has the new certificates.
old_ca=
if [ -z "$out" ] && kubectl -n "$namespace" get secret podiam-ca >/dev/null 2>&1; then
  kubectl -n "$namespace" get secret podiam-ca -o jsonpath='{.data.tls\.crt}' | base64 -d > "$work/old-ca.crt"
  kubectl -n "$namespace" get secret podiam-ca -o jsonpath='{.data.tls\.key}' | base64 -d > "$work/old-ca.key"
  if [ ! -s "$work/old-ca.crt" ] || [ ! -s "$work/old-ca.key" ]; then
    echo "gen-certs.sh: secret $namespace/podiam-ca lacks tls.crt or tls.key; delete it or fix it" >&2
    exit 1
  fi
  if [ "$keep_ca" = 1 ]; then
    cp "$work/old-ca.crt" "$dir/ca.crt"
    cp "$work/old-ca.key" "$dir/ca.key"
    echo "reusing the CA in secret $namespace/podiam-ca"
  else
    old_ca=$work/old-ca.crt
    new_ca
    echo "new CA; the old one stays trusted until the next run"
  fi
elif [ ! -s "$dir/ca.crt" ] || [ ! -s "$dir/ca.key" ] || [ "$keep_ca" = 0 ]; then
  new_ca
fi

leaf() { # name, extensions
  ssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/$1.key" -out "$work/$1.csr" -subj "/CN=$1"
  printf '%s\n' "$2" > "$work/$1.ext"
  ssl x509 -req -in "$work/$1.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/$1.crt" -days "$days" -extfile "$work/$1.ext"
}
svc=podiam-server
leaf podiam-server "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:$svc,DNS:$svc.$namespace,DNS:$svc.$namespace.svc,DNS:$svc.$namespace.svc.cluster.local,DNS:podiam-webhook.$namespace.svc"
leaf podiam-agent "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

if [ -n "$out" ]; then
  echo "wrote ca.crt, ca.key, podiam-server.{crt,key}, podiam-agent.{crt,key} to $out"
  exit 0
fi

kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"
# What the pods trust: the CA, and during a CA change the old one too.
cat "$dir/ca.crt" ${old_ca:+"$old_ca"} > "$work/trust.crt"
secret() { # name, cert, key
  kubectl -n "$namespace" create secret generic "$1" \
    --from-file=ca.crt="$work/trust.crt" --from-file=tls.crt="$2" --from-file=tls.key="$3" \
    --dry-run=client -o yaml | kubectl apply -f -
}
kubectl -n "$namespace" create secret tls podiam-ca --cert="$dir/ca.crt" --key="$dir/ca.key" \
  --dry-run=client -o yaml | kubectl apply -f -
secret podiam-server-tls "$dir/podiam-server.crt" "$dir/podiam-server.key"
secret podiam-agent-tls "$dir/podiam-agent.crt" "$dir/podiam-agent.key"
echo "secrets podiam-server-tls and podiam-agent-tls are in namespace $namespace (valid $days days)"
# components/pod-identity's webhook: the API server must trust the server's certificate.
if kubectl get mutatingwebhookconfiguration podiam-pod-identity >/dev/null 2>&1; then
  bundle=$(base64 -w0 < "$work/trust.crt")
  kubectl patch mutatingwebhookconfiguration podiam-pod-identity --type=json \
    -p "[{\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$bundle\"}]" >/dev/null
  echo "the caBundle of mutatingwebhookconfiguration podiam-pod-identity is the CA"
else
  echo "(no mutatingwebhookconfiguration podiam-pod-identity yet: with components/pod-identity, rerun this script after applying)"
fi
