//! Links the system ISA-L (`libisal`, soname 2), whose inflate streams gzip
//! layers (`src/sys/isal.rs`), found with pkg-config; without it the build
//! stops here with what to install instead of an undefined-symbol error
//! from the linker.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // 2.30 is the release whose `struct inflate_state` src/sys/isal.rs
    // mirrors (and checks offset by offset); soname 2, all of 2.x, keeps
    // that layout, a 3.x may not.
    if let Err(e) = pkg_config::Config::new()
        .range_version("2.30".."3")
        .probe("libisal")
    {
        panic!(
            "\n\nunlade links the system ISA-L (libisal 2.30 or later 2.x) for its \
             streaming gzip decoder, and pkg-config does not find it:\n{e}\n\n\
             Install it and pkg-config: Debian / Ubuntu `apt-get install libisal-dev pkg-config`, Fedora \
             `dnf install isa-l-devel`, Arch `pacman -S isa-l`; or set PKG_CONFIG_PATH \
             to the directory of its libisal.pc.\n\n"
        );
    }
}
