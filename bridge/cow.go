package bridge

import (
	"sync"
	"sync/atomic"
)

// cowMap is a copy-on-write map for the hot path: lookups are one atomic
// load and a map read without locks; adding (rare: a new rule, cell or
// broker) copies the map under a mutex.
type cowMap[K comparable, V any] struct {
	mu sync.Mutex
	p  atomic.Pointer[map[K]V]
}

// load returns the current map (never modified; nil before the first add).
func (c *cowMap[K, V]) load() map[K]V {
	if m := c.p.Load(); m != nil {
		return *m
	}
	return nil
}

// get returns the value of k, adding mk() first when k is missing.
func (c *cowMap[K, V]) get(k K, mk func() V) V {
	if v, ok := c.load()[k]; ok {
		return v
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.load()
	if v, ok := old[k]; ok {
		return v
	}
	v := mk()
	next := make(map[K]V, len(old)+1)
	for key, val := range old {
		next[key] = val
	}
	next[k] = v
	c.p.Store(&next)
	return v
}
