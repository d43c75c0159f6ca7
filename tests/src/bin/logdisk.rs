//! `logdisk IMAGE MOUNTPOINT LOG`: a FUSE file system with one file,
//! `disk`, whose initial content is IMAGE (held in memory), that records
//! every write and every flush (fsync) made to it in LOG, in order. Put a
//! loop device on `MOUNTPOINT/disk` and a file system on the loop device,
//! and LOG is what dm-log-writes would record: the writes the block device
//! received and the points where the file system asked for them to be
//! durable. The power-loss test replays prefixes of it.
//!
//! The file is opened in direct-I/O mode, so every write reaches this
//! process when the loop device issues it (no page cache in between), and
//! requests are served one at a time, so the log order is the completion
//! order. Exits when the file system is unmounted.
//!
//! Log records: `b'W'`, offset (u64 LE), length (u64 LE), data; `b'F'`,
//! 0, 0 (a flush: everything before it is durable).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

const TTL: Duration = Duration::from_secs(3600);
const DISK: INodeNo = INodeNo(2);

struct LogDisk {
    state: Mutex<State>,
}

struct State {
    data: Vec<u8>,
    log: BufWriter<File>,
}

fn attr(ino: INodeNo, size: u64) -> FileAttr {
    let dir = ino == INodeNo::ROOT;
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o600 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl LogDisk {
    fn size(&self) -> u64 {
        self.state.lock().unwrap().data.len() as u64
    }

    fn record(st: &mut State, kind: u8, off: u64, data: &[u8]) {
        let r = st
            .log
            .write_all(&[kind])
            .and_then(|()| st.log.write_all(&off.to_le_bytes()))
            .and_then(|()| st.log.write_all(&(data.len() as u64).to_le_bytes()))
            .and_then(|()| st.log.write_all(data));
        if let Err(e) = r {
            eprintln!("logdisk: write log: {e}");
            std::process::exit(1);
        }
    }
}

impl Filesystem for LogDisk {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == "disk" {
            reply.entry(&TTL, &attr(DISK, self.size()), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&TTL, &attr(ino, 0)),
            DISK => reply.attr(&TTL, &attr(ino, self.size())),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let st = self.state.lock().unwrap();
        let start = (offset as usize).min(st.data.len());
        let end = (start + size as usize).min(st.data.len());
        reply.data(&st.data[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.state.lock().unwrap();
        let start = offset as usize;
        if start + data.len() > st.data.len() {
            reply.error(Errno::ENOSPC);
            return;
        }
        st.data[start..start + data.len()].copy_from_slice(data);
        Self::record(&mut st, b'W', offset, data);
        reply.written(data.len() as u32);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state.lock().unwrap();
        Self::record(&mut st, b'F', 0, &[]);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(), not a durability request.
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Discard / zero-out from the loop device: the range reads as zeros.
        let mut st = self.state.lock().unwrap();
        let start = (offset as usize).min(st.data.len());
        let end = (start + length as usize).min(st.data.len());
        st.data[start..end].fill(0);
        let zeros = vec![0u8; end - start];
        Self::record(&mut st, b'W', offset, &zeros);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, "disk"),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, image, mountpoint, log] = args.as_slice() else {
        eprintln!("usage: logdisk IMAGE MOUNTPOINT LOG");
        std::process::exit(2);
    };
    let data = std::fs::read(image).unwrap_or_else(|e| {
        eprintln!("logdisk: read {image}: {e}");
        std::process::exit(1);
    });
    let log = File::create(log).unwrap_or_else(|e| {
        eprintln!("logdisk: create {log}: {e}");
        std::process::exit(1);
    });
    let fs = LogDisk {
        state: Mutex::new(State {
            data,
            log: BufWriter::with_capacity(1 << 20, log),
        }),
    };
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("logdisk".into()), MountOption::RW];
    config.acl = fuser::SessionACL::All;
    if let Err(e) = fuser::mount(fs, mountpoint, &config) {
        eprintln!("logdisk: mount {mountpoint}: {e}");
        std::process::exit(1);
    }
}
