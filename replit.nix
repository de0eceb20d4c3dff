# System packages for the Replit workspace; the Rust toolchain itself comes from the
# "rust-stable" module named in .replit.
{ pkgs }: {
  deps = [
    # A C compiler for the crates with C parts (ring, under the Postgres driver's TLS).
    pkgs.gcc
    # To check the deployment from the Shell: curl -H "X-API-Key: $MAESTRA_API_KEY" .../health
    pkgs.curl
  ];
}
