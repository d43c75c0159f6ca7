//! Links the system ISA-L (`libisal`, soname 2), whose inflate streams gzip
//! layers (`src/sys/isal.rs`), found with pkg-config, and says so to the
//! code with `cfg(unlade_isal)`. Without it the build goes on with a
//! warning and gzip streams through zlib-rs, about 12% more CPU for the
//! inflate (see `GzipStreamer`): a runtime embedding unlade on a machine
//! without libisal-dev still builds. `UNLADE_REQUIRE_ISAL=1` (the test
//! script sets it) turns the warning into an error, so CI cannot pass on
//! the fallback by accident.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=UNLADE_REQUIRE_ISAL");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo::rustc-check-cfg=cfg(unlade_isal)");
    // 2.30 is the release whose `struct inflate_state` src/sys/isal.rs
    // mirrors (and checks offset by offset); soname 2, all of 2.x, keeps
    // that layout, a 3.x may not.
    match pkg_config::Config::new()
        .range_version("2.30".."3")
        .probe("libisal")
    {
        Ok(_) => println!("cargo:rustc-cfg=unlade_isal"),
        Err(e) => {
            let required = std::env::var("UNLADE_REQUIRE_ISAL").is_ok_and(|v| v == "1");
            let what = format!(
                "pkg-config does not find ISA-L (libisal 2.30 or later 2.x): {}; \
                 streaming gzip falls back to zlib-rs. Install it and pkg-config for the \
                 faster inflate: Debian / Ubuntu `apt-get install libisal-dev pkg-config`, \
                 Fedora `dnf install isa-l-devel`, Arch `pacman -S isa-l`",
                e.to_string()
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("not found")
            );
            if required {
                panic!("\n\nUNLADE_REQUIRE_ISAL=1 and {what}\n\n");
            }
            println!("cargo:warning={what}");
        }
    }
}
