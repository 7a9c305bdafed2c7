package natstest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// FreePorts returns n distinct loopback ports that were free a moment ago
// and that no earlier call in this process returned.
//
// The second part matters for a test that keeps a port for a server it
// starts later (a bridge started before its broker): the port is free
// meanwhile, and without the record the next call (the bridge's own HTTP
// port, say) could be given the same one, leaving the bridge to dial its
// own HTTP listener as its broker.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	ports, err := freePorts(n)
	if err != nil {
		t.Fatal(err)
	}
	return ports
}

// FreePortsE is FreePorts for callers without a testing.TB (the bench).
func FreePortsE(n int) ([]int, error) { return freePorts(n) }

// freePorts picks ports below the kernel's ephemeral range where it can.
//
// A port taken with Listen(":0") comes from the ephemeral range, the range
// every outgoing connection on the machine also draws its local port from:
// between closing the probe listener and the child process binding the port,
// any client socket (another test's connection to its own server, say) may
// be given it, and the child fails with "address already in use". A port
// below the range is only ever taken by an explicit bind, which here means
// another test choosing the same random port in the same few milliseconds.
//
// Ports handed out are recorded twice: in this process (handed), and in a
// file every test process on the machine shares (withSharedPorts; the
// packages' test binaries run at once), where each stays reserved for
// sharedPortTTL. A test that keeps a port unbound for seconds (a server it
// restarts, a broker it starts after the bridge) is then safe from other
// processes' draws as well.
func freePorts(n int) ([]int, error) {
	handedMu.Lock()
	defer handedMu.Unlock()
	var ports []int
	var err error
	withSharedPorts(func(shared map[int]bool) []int {
		ports, err = drawPorts(n, shared)
		if err != nil && len(shared) > 0 {
			// The other processes' reservations crowd the range (many
			// runs within their TTL): a rare collision beats no port.
			ports, err = drawPorts(n, nil)
		}
		return ports
	})
	return ports, err
}

// drawPorts draws n ports that are free now and in neither handed nor
// shared, and records them in handed. The caller holds handedMu.
func drawPorts(n int, shared map[int]bool) ([]int, error) {
	lo, hi := pickRange()
	if hi > lo && len(handed) > (hi-lo)/2 {
		clear(handed) // a process that used half the range: start over
	}
	ports := make([]int, 0, n)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for attempt := 0; len(ports) < n && attempt < 200*n; attempt++ {
		addr := "127.0.0.1:0"
		if hi > lo {
			addr = "127.0.0.1:" + strconv.Itoa(lo+rand.IntN(hi-lo))
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue // taken: draw again
		}
		ls = append(ls, l)
		port := l.Addr().(*net.TCPAddr).Port
		if _, ok := handed[port]; ok || shared[port] {
			continue // free now, but an earlier caller may still mean to bind it
		}
		ports = append(ports, port)
	}
	if len(ports) < n {
		return nil, fmt.Errorf("natstest: found %d free loopback ports of %d", len(ports), n)
	}
	for _, p := range ports {
		handed[p] = struct{}{}
	}
	return ports, nil
}

// sharedPortsFile is the registry of ports handed out by test processes; a
// variable so that this package's own tests can use a private one.
var sharedPortsFile = func() string { return filepath.Join(os.TempDir(), "cellbridge-natstest-ports") }

// handed holds every port freePorts returned in this process.
var (
	handedMu sync.Mutex
	handed   = map[int]struct{}{}
)

// pickRange is the range random ports are drawn from: the 10,000 ports
// below the ephemeral range (Linux's ip_local_port_range), or an empty
// range (use ":0") where that cannot be read or leaves no room.
func pickRange() (lo, hi int) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, 0
	}
	eph, err := strconv.Atoi(f[0])
	if err != nil || eph < 11024 {
		return 0, 0
	}
	return eph - 10000, eph
}
