// gotar: writes a tar of a directory tree with Go's archive/tar, the way
// Docker, containerd and BuildKit write layers (sorted walk, hard links by
// inode, numeric owners, xattrs as SCHILY.xattr PAX records).
//
// Usage: gotar pax|gnu|ustar SRC OUT
package main

import (
	"archive/tar"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func xattrs(path string) map[string]string {
	out := map[string]string{}
	buf := make([]byte, 65536)
	n, err := syscall.Listxattr(path, buf)
	if err != nil || n <= 0 {
		return out
	}
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		val := make([]byte, 65536)
		k, err := syscall.Getxattr(path, name, val)
		if err == nil {
			out[name] = string(val[:k])
		}
	}
	return out
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: gotar pax|gnu|ustar SRC OUT")
		os.Exit(2)
	}
	format := map[string]tar.Format{"pax": tar.FormatPAX, "gnu": tar.FormatGNU, "ustar": tar.FormatUSTAR}[os.Args[1]]
	src := os.Args[2]
	f, err := os.Create(os.Args[3])
	if err != nil {
		panic(err)
	}
	tw := tar.NewWriter(f)
	seen := map[uint64]string{}
	err = filepath.Walk(src, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		if rel == "." {
			return nil
		}
		link := ""
		if fi.Mode()&os.ModeSymlink != 0 {
			link, _ = os.Readlink(path)
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		hdr.Name = rel
		if fi.IsDir() {
			hdr.Name += "/"
		}
		st := fi.Sys().(*syscall.Stat_t)
		hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
		hdr.Uname, hdr.Gname = "", ""
		hdr.Format = format
		if format != tar.FormatPAX {
			hdr.ModTime = hdr.ModTime.Truncate(1e9)
		}
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			if first, ok := seen[st.Ino]; ok {
				hdr.Typeflag = tar.TypeLink
				hdr.Linkname = first
				hdr.Size = 0
			} else {
				seen[st.Ino] = rel
			}
		}
		if format == tar.FormatPAX && fi.Mode()&os.ModeSymlink == 0 {
			for k, v := range xattrs(path) {
				if hdr.PAXRecords == nil {
					hdr.PAXRecords = map[string]string{}
				}
				hdr.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if _, err := tw.Write(data); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		panic(err)
	}
	if err := tw.Close(); err != nil {
		panic(err)
	}
	f.Close()
}
