//! Every `unsafe` block of the crate lives here, each a thin wrapper that
//! states the invariant it relies on: memory maps of layer files, the
//! libdeflate FFI (whose `_ex` variant, needed for multi-member gzip, the
//! safe `libdeflater` crate does not expose), the ISA-L inflate FFI
//! ([`isal`], the streaming gzip decoder), and the `fchmodat2` syscall
//! (chmod without following a symlink, which rustix does not offer).

/// io_uring: a ring that owns what its in-flight operations point at.
pub mod uring;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use rustix::fs::Mode;

/// Built where `build.rs` found libisal (`cfg(unlade_isal)`).
#[cfg(unlade_isal)]
pub mod isal;

/// A read-only memory map of a layer file.
pub struct Map(memmap2::Mmap);

impl std::ops::Deref for Map {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Map {
    /// Drops this process's page-table entries for the mapping's bytes
    /// before `end` (the kernel rounds up to a page), so pages the parser and the
    /// hasher are done with stop counting toward the process's RSS: a
    /// whole plain layer mapped at once would otherwise make RSS the size
    /// of the layer. The pages stay in the page cache; a later read of
    /// them faults them back in, unchanged.
    pub fn release_before(&self, end: usize) {
        let end = end.min(self.0.len());
        if end == 0 {
            return;
        }
        // SAFETY: MADV_DONTNEED on this read-only, file-backed mapping
        // only unmaps pages; a later access maps the file's pages again,
        // whose contents `map_layer`'s caller promises do not change. So
        // every `&[u8]` lent from the map stays valid and reads the same
        // bytes. (On anonymous memory it would zero them: only `Map`,
        // which is always file-backed, offers it.)
        let _ = unsafe {
            self.0
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, end)
        };
    }
}

/// Maps a layer file read-only, the input of the whole-buffer paths.
///
/// # Safety
///
/// The caller promises that nothing writes to or truncates `file` (through
/// any descriptor or path, in any process) while the returned [`Map`]
/// lives. The map is handed out as a `&[u8]`, which Rust assumes does not
/// change: a write under it is undefined behaviour (the parser may see two
/// different bytes at one place), and reading past a truncation raises
/// SIGBUS, which kills the process instead of failing the apply.
///
/// The promise is the caller's because only the caller knows where the
/// file comes from (the same choice ripgrep's `MmapChoice` makes): this
/// function maps whatever it is given. Unlinking or renaming the file is
/// fine (the map keeps the inode).
pub unsafe fn map_layer(file: &File) -> io::Result<Map> {
    // SAFETY: the caller upholds that the file is not modified while the
    // map lives (see above); the map is read-only and `Map` owns it, so no
    // slice of it outlives the mapping.
    let m = unsafe { memmap2::MmapOptions::new().map(file)? };
    // Layers are read front to back once.
    let _ = m.advise(memmap2::Advice::Sequential);
    Ok(Map(m))
}

/// Outcome of one libdeflate gzip member decode.
pub enum Inflate {
    /// The member decoded: (compressed bytes consumed, bytes written).
    Done(usize, usize),
    /// The output buffer was too small.
    NoSpace,
    /// The data is not valid gzip (bad header, block, CRC or ISIZE).
    BadData,
}

/// An owned libdeflate decompressor.
pub struct Deflate(*mut libdeflate_sys::libdeflate_decompressor);

// SAFETY: a libdeflate decompressor is plain heap state with no thread
// affinity; `&mut self` methods ensure exclusive use.
unsafe impl Send for Deflate {}

impl Deflate {
    /// Allocates a decompressor.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no preconditions; a null return means out of memory.
        let p = unsafe { libdeflate_sys::libdeflate_alloc_decompressor() };
        if p.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Deflate(p))
    }

    /// Decodes the gzip member at the start of `input` into `out`,
    /// verifying its CRC32 and ISIZE.
    pub fn gzip_member(&mut self, input: &[u8], out: &mut [u8]) -> Inflate {
        let mut used_in = 0usize;
        let mut used_out = 0usize;
        // SAFETY: the pointers and lengths come from live slices; libdeflate
        // reads at most `input.len()` bytes, writes at most `out.len()`
        // bytes, and writes the two counts through valid pointers.
        let r = unsafe {
            libdeflate_sys::libdeflate_gzip_decompress_ex(
                self.0,
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out.len(),
                &mut used_in,
                &mut used_out,
            )
        };
        match r {
            libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS => {
                Inflate::Done(used_in, used_out)
            }
            libdeflate_sys::libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE => Inflate::NoSpace,
            _ => Inflate::BadData,
        }
    }
}

impl Drop for Deflate {
    fn drop(&mut self) {
        // SAFETY: the pointer came from libdeflate_alloc_decompressor and is
        // freed exactly once.
        unsafe { libdeflate_sys::libdeflate_free_decompressor(self.0) }
    }
}

/// `fchmodat2(dirfd, name, mode, AT_SYMLINK_NOFOLLOW)`: changes the mode of
/// `name` in `dir` without following a symlink. Fails with `ENOSYS` on
/// kernels before 6.6 (the caller falls back) and with `EOPNOTSUPP` if
/// `name` is a symlink.
pub fn chmod_nofollow(dir: impl AsFd, name: &std::ffi::CStr, mode: Mode) -> io::Result<()> {
    // SAFETY: the fd is live for the call (borrowed), `name` is a valid
    // NUL-terminated string, and fchmodat2 reads nothing else.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_fd().as_raw_fd(),
            name.as_ptr(),
            mode.bits() as libc::c_uint,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `struct xattr_args` of `setxattrat(2)`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// `setxattrat(2)`'s number: new system calls share one number on every
/// architecture since Linux 5.1 (the generic table).
const SYS_SETXATTRAT: libc::c_long = 463;

/// `setxattrat(dir, name, AT_SYMLINK_NOFOLLOW, key, value)`: sets an
/// extended attribute of `name` in `dir` (a symlink itself, never what it
/// points to). Fails with `ENOSYS` before Linux 6.13 (the caller falls
/// back).
pub fn setxattr_nofollow(
    dir: impl AsFd,
    name: &std::ffi::CStr,
    key: &std::ffi::CStr,
    value: &[u8],
) -> io::Result<()> {
    let size = u32::try_from(value.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let args = XattrArgs {
        value: value.as_ptr() as u64,
        size,
        flags: 0,
    };
    // SAFETY: the fd is live for the call (borrowed); `name` and `key` are
    // NUL-terminated; `args` points at `value`, which outlives the call, and
    // its size is passed as the struct size the kernel checks; the kernel
    // only reads through these pointers.
    let r = unsafe {
        libc::syscall(
            SYS_SETXATTRAT,
            dir.as_fd().as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            key.as_ptr(),
            &args as *const XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Starts writeback of a file's dirty pages without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later `fsync`
/// finds the data already on its way: how a layer's files are synced in
/// one overlapped sweep rather than one blocking flush each.
pub fn start_writeback(fd: impl AsFd) -> io::Result<()> {
    // SAFETY: sync_file_range takes an fd and plain integers; the fd is
    // valid for the duration of the call (borrowed), and no memory is
    // passed.
    let r =
        unsafe { libc::sync_file_range(fd.as_fd().as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn released_pages_read_back_unchanged() {
        let path = std::env::temp_dir().join(format!("unlade-map-{}", std::process::id()));
        let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i * 31 % 251) as u8).collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        let f = File::open(&path).unwrap();
        // SAFETY: a private temporary file nothing else writes.
        let m = unsafe { map_layer(&f) }.unwrap();
        assert_eq!(&m[..], &data[..]);
        m.release_before(1 << 20);
        m.release_before(usize::MAX);
        assert_eq!(
            &m[..],
            &data[..],
            "a released page must refault with the file's bytes"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
