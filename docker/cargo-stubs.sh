#!/bin/sh
# Create a stub source file for every target that Cargo.toml (in the current
# directory) names or implies, where it does not exist, so that
# `cargo build` can compile the dependencies from the manifests alone (the
# Docker layer that caches them). Prints the files it created, one a line:
#   docker/cargo-stubs.sh > /tmp/stubs && cargo build ... && xargs rm -f < /tmp/stubs
set -eu
pkg=$(awk -F'"' '/^\[package\]/ {p = 1; next} /^\[/ {p = 0} p && /^[[:space:]]*name[[:space:]]*=/ {print $2; exit}' Cargo.toml)
{
  echo src/main.rs
  echo src/lib.rs
  # [[bin]], [[test]], [[bench]], [[example]] and [lib]: the explicit path, or
  # Cargo's default one for the target's name.
  awk -v pkg="$pkg" -F'"' '
    function flush() {
      if (kind == "") return
      if (path != "") print path
      else if (kind == "bin") print (name == pkg ? "src/main.rs" : "src/bin/" name ".rs")
      else if (kind == "test") print "tests/" name ".rs"
      else if (kind == "bench") print "benches/" name ".rs"
      else if (kind == "example") print "examples/" name ".rs"
      kind = ""; name = ""; path = ""
    }
    /^\[/ { flush() }
    /^\[\[(bin|test|bench|example)\]\]/ { kind = $0; gsub(/[\[\] \t]/, "", kind) }
    /^\[lib\]/ { kind = "lib" }
    kind != "" && /^[[:space:]]*name[[:space:]]*=/ { name = $2 }
    kind != "" && /^[[:space:]]*path[[:space:]]*=/ { path = $2 }
    END { flush() }
  ' Cargo.toml
} | sort -u | while read -r f; do
  [ -n "$f" ] && [ ! -e "$f" ] || continue
  mkdir -p "$(dirname "$f")"
  echo 'fn main() {}' >"$f"
  echo "$f"
done
