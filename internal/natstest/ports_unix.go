//go:build unix

package natstest

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// haveSharedPorts: test processes share a registry of ports here.
const haveSharedPorts = true

// sharedPortTTL is how long a port handed out stays reserved for every test
// process on the machine: longer than any test keeps a port it drew.
const sharedPortTTL = 15 * time.Minute

// withSharedPorts calls draw with the ports other test processes reserved
// (still within their TTL) and records the ports it returns, all under an
// exclusive lock of the registry. When the registry cannot be used, draw
// gets an empty set: the draw is then only safe within this process.
func withSharedPorts(draw func(shared map[int]bool) []int) {
	path := sharedPortsFile()
	unlock, err := lockFile(path+".lock", 10*time.Second)
	if err != nil {
		draw(nil)
		return
	}
	defer unlock()
	now := time.Now()
	shared := map[int]bool{}
	var keep []string
	if f, err := os.Open(path); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			port, exp, ok := strings.Cut(sc.Text(), " ")
			p, err1 := strconv.Atoi(port)
			e, err2 := strconv.ParseInt(exp, 10, 64)
			if !ok || err1 != nil || err2 != nil || time.Unix(0, e).Before(now) {
				continue
			}
			shared[p] = true
			keep = append(keep, sc.Text())
		}
		f.Close()
	}
	ports := draw(shared)
	exp := now.Add(sharedPortTTL).UnixNano()
	for _, p := range ports {
		keep = append(keep, fmt.Sprintf("%d %d", p, exp))
	}
	// Written whole, then renamed over the old one: a process killed
	// mid-write leaves the previous registry, not half of one.
	tmp := fmt.Sprintf("%s.%d", path, os.Getpid())
	if err := os.WriteFile(tmp, []byte(strings.Join(keep, "\n")+"\n"), 0o644); err == nil {
		_ = os.Rename(tmp, path)
	}
}
