package config

import (
	"os"
	"strings"
	"testing"
)

// docs/configuration.md lists every configuration field with its default, as
// `cellbridge run -defaults` prints it; it must not drift from the table
// applyDefaults reads.
func TestConfigDocListsEveryDefault(t *testing.T) {
	b, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	var table strings.Builder
	WriteDefaults(&table)
	if !strings.Contains(string(b), table.String()) {
		t.Errorf("docs/configuration.md's configuration table differs from the defaults; replace it with the output of `cellbridge run -defaults`:\n%s", table.String())
	}
}
