package natstest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// FreePorts returns n distinct loopback ports that were free a moment ago
// (all held open at once, so none is returned twice).
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
func freePorts(n int) ([]int, error) {
	lo, hi := pickRange()
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
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	if len(ports) < n {
		return nil, fmt.Errorf("natstest: found %d free loopback ports of %d", len(ports), n)
	}
	return ports, nil
}

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
