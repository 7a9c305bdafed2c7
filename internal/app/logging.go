package app

import (
	"io"
	"log/slog"
	"os"

	"github.com/cellbridge/cellbridge/internal/config"
)

// NewLogger returns the process logger: JSON when format is json, or when it
// is auto and w is not a terminal (log collectors parse it); text otherwise.
func NewLogger(cfg config.LogConfig, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level)) // validated; "" stays info
	opts := &slog.HandlerOptions{Level: level}
	json := cfg.Format == "json" || (cfg.Format != "text" && !IsTerminal(w))
	if json {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// IsTerminal reports whether w is a character device (a terminal), without
// a dependency on x/term.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
