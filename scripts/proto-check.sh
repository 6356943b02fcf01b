#!/usr/bin/env bash
# Fails when the committed generated code (Go, gRPC, gateway, and the
# OpenAPI document) differs from what `make proto` would produce, or when
# the protos break compatibility with main.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=(go tool -modfile=tools/go.mod buf)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${buf[@]}" generate --output "$tmp"
stale=0
while IFS= read -r -d '' f; do
  rel=${f#"$tmp"/}
  if ! cmp -s "$f" "$rel"; then
    echo "stale generated file: $rel (run 'make proto' and commit)"
    stale=1
  fi
done < <(find "$tmp" -type f \( -name '*.go' -o -name '*.json' \) -print0)
while IFS= read -r -d '' f; do
  [ -e "$tmp/$f" ] || { echo "generated file without a source: $f"; stale=1; }
done < <(find proto -type f \( -name '*.pb.go' -o -name '*.pb.gw.go' -o -name '*.swagger.json' \) -print0)
[ "$stale" = 0 ] || exit 1
echo "generated code is up to date"

# Breaking-change check against main, once main has protos. Skipped when
# the checkout has no main branch or main has no proto files yet.
if git rev-parse --verify -q main >/dev/null && [ -n "$(git ls-tree -r --name-only main -- proto | grep '\.proto$' || true)" ]; then
  "${buf[@]}" breaking --against '.git#branch=main'
  echo "no breaking change against main"
else
  echo "buf breaking: skipped (main has no protos yet)"
fi
