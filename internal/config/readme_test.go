package config

import (
	"os"
	"strings"
	"testing"
)

// The README lists every configuration field with its default, as
// `cellbridge run -defaults` prints it; it must not drift from the table
// applyDefaults reads.
func TestREADMEListsEveryDefault(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var table strings.Builder
	WriteDefaults(&table)
	if !strings.Contains(string(b), table.String()) {
		t.Errorf("README.md's configuration table differs from the defaults; replace it with the output of `cellbridge run -defaults`:\n%s", table.String())
	}
}
