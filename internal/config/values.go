package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// Secret is a credential. Its String, GoString and slog value are redacted
// so that it never reaches a log line by accident; Value returns it. In the
// file it may be written as ${ENV}, file:/path (a mounted secret) or in
// clear (which logs a warning at start-up).
type Secret string

// Value returns the secret in clear.
func (s Secret) Value() string { return string(s) }

// String returns "" or "<redacted>".
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "<redacted>"
}

// GoString keeps %#v from printing the secret.
func (s Secret) GoString() string { return strconv.Quote(s.String()) }

// MarshalText keeps encoders from printing the secret.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Path is a file or directory path; a relative path is relative to the
// directory of the configuration file.
type Path string

// Duration is a time.Duration written as a Go duration string ("250ms", "10m").
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String formats like time.Duration.
func (d Duration) String() string { return time.Duration(d).String() }

// ParseScalar parses a duration ("250ms", "10m"); negative ones are refused.
func (d *Duration) ParseScalar(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("must be a duration like 500ms, 5s or 10m, not %q", s)
	}
	if v < 0 {
		return fmt.Errorf("must not be negative, got %s", s)
	}
	*d = Duration(v)
	return nil
}

// ByteSize is a size in bytes written as an integer or with a unit
// (B, KiB, MiB, GiB, KB, MB, GB).
type ByteSize int64

var byteUnits = map[string]int64{"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
	"kb": 1e3, "mb": 1e6, "gb": 1e9, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

// ParseScalar parses a size: an integer with an optional unit.
func (b *ByteSize) ParseScalar(s string) error {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	unit, ok := byteUnits[strings.ToLower(strings.TrimSpace(t[i:]))]
	if err != nil || !ok || n > (1<<62)/unit {
		return fmt.Errorf("must be a size like 1048576, 512KiB or 1MiB, not %q", s)
	}
	*b = ByteSize(n * unit)
	return nil
}

// Problem is one configuration error, located in its file: the problem
// type of every YAML file the bridge reads (rule files too).
type Problem = strictyaml.Problem

// Errors lists every problem of a configuration, in file order; its text
// has one "file:line: field: message" per line.
type Errors = strictyaml.Errors
