// Runs containerd 1.6's snapshotter conformance suite
// (snapshots/testsuite.SnapshotterSuite) against `unlade snapshotter`,
// through containerd's own proxy client (snapshots/proxy), as containerd
// uses a `[proxy_plugins]` snapshotter. Built in GOPATH mode against
// Debian's golang-github-containerd-containerd-dev; see run.sh.
//
// Environment:
//
//	UNLADE_BIN               the unlade binary: each case starts its own
//	                         `unlade snapshotter --root ROOT --address ROOT/s.sock`
//	                         on the suite's fresh ROOT, and stops it (SIGTERM)
//	                         in the case's cleanup. The default mode.
//	UNLADE_ARGS              extra arguments for it (space-separated).
//	UNLADE_SNAPSHOTTER_SOCK  without UNLADE_BIN: every case talks to the one
//	                         snapshotter already serving on this socket.
//	                         Cases reuse names ("c1", "a1", ...) and run in
//	                         parallel, so only single cases (-test.run) give
//	                         meaningful results that way.
//
// Needs root (the suite mounts what the snapshotter returns) and -test.root.
package conformance

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

// The name containerd gives a proxy snapshotter is its proxy_plugins key.
const pluginName = "unlade"

func TestUnlade(t *testing.T) {
	testutil.RequiresRoot(t)
	bin := os.Getenv("UNLADE_BIN")
	sock := os.Getenv("UNLADE_SNAPSHOTTER_SOCK")
	if bin == "" && sock == "" {
		t.Fatal("set UNLADE_BIN (a fresh snapshotter per case) or UNLADE_SNAPSHOTTER_SOCK (a running one)")
	}
	testsuite.SnapshotterSuite(t, "unlade", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		if bin == "" {
			return connect(ctx, sock, func() error { return nil })
		}
		return startUnlade(ctx, bin, root)
	})
}

// connect dials the snapshotter on unix socket `sock` as containerd's
// proxy_plugins do, waiting (up to 20 s) until it answers.
func connect(ctx context.Context, sock string, stop func() error) (snapshots.Snapshotter, func() error, error) {
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(dctx, dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(dialer.ContextDialer),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("dial %s: %w", sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), pluginName)
	return sn, func() error {
		cerr := conn.Close()
		if err := stop(); err != nil {
			return err
		}
		return cerr
	}, nil
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startUnlade starts `unlade snapshotter` on the suite's fresh `root`
// (unlade keeps its snapshots in root/containerd) and returns the proxy
// snapshotter on it; the cleanup stops it and unmounts whatever is left
// mounted under the case's temporary directory.
func startUnlade(ctx context.Context, bin, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "s.sock")
	args := []string{"snapshotter", "--root", root, "--address", sock}
	args = append(args, strings.Fields(os.Getenv("UNLADE_ARGS"))...)
	cmd := exec.Command(bin, args...)
	out := &syncBuf{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	stop := func() error {
		var err error
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case werr := <-exited:
			if werr != nil {
				err = fmt.Errorf("unlade snapshotter exited badly after SIGTERM: %v", werr)
			}
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			err = fmt.Errorf("unlade snapshotter did not stop within 15s of SIGTERM (killed)")
		}
		if s := strings.TrimSpace(out.String()); s != "" {
			log.G(ctx).Infof("unlade output:\n%s", s)
		}
		// The suite's temporary directory (root's parent) is removed
		// next; nothing may stay mounted in it.
		if left := unmountUnder(filepath.Dir(root)); len(left) > 0 {
			msg := fmt.Sprintf("left mounted after the case, unmounted by the harness: %s", strings.Join(left, ", "))
			log.G(ctx).Warn(msg)
			if err == nil && os.Getenv("UNLADE_STRICT_MOUNTS") != "" {
				err = fmt.Errorf("%s", msg)
			}
		}
		return err
	}

	sn, cleanup, err := connect(ctx, sock, stop)
	if err != nil {
		select {
		case werr := <-exited:
			err = fmt.Errorf("%v (unlade exited: %v; output: %s)", err, werr, out.String())
		default:
			_ = stop()
		}
		return nil, nil, err
	}
	return sn, cleanup, nil
}

// unmountUnder lazily unmounts every mount point at or under dir, deepest
// first, and returns them.
func unmountUnder(dir string) []string {
	var points []string
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		w := strings.Split(sc.Text(), " ")
		if len(w) < 5 {
			continue
		}
		p := unescape(w[4])
		if p == dir || strings.HasPrefix(p, dir+"/") {
			points = append(points, p)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	for _, p := range points {
		_ = unix.Unmount(p, unix.MNT_DETACH)
	}
	return points
}

// unescape undoes mountinfo's octal escapes (\040 and the like).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
