package strictyaml

import (
	"fmt"
	"strings"
	"testing"
)

// The benchmarks measure the worst cases the limits admit: what a file can
// cost before the first problem is reported.

// BenchmarkDocuments parses files at the size cap (and one beyond yaml.v3's
// depth limit) into node trees.
func BenchmarkDocuments(b *testing.B) {
	var pins strings.Builder
	pins.WriteString("pins:\n")
	for i := 0; pins.Len() < MaxFileBytes-64; i++ {
		fmt.Fprintf(&pins, "  - {key: \"%016d\", cell: a1}\n", i)
	}
	for _, c := range []struct {
		name string
		data string
	}{
		{"pins-2MiB", pins.String()},
		{"flow-ints-2MiB", "[" + strings.Repeat("1,", MaxFileBytes/2-2) + "1]"},
		{"flow-nesting-9999", strings.Repeat("[", 9999) + strings.Repeat("]", 9999)},
		{"block-nesting-9999", strings.Repeat("- ", 9999) + "x"},
		{"flow-nesting-10001", strings.Repeat("[", 10001)},
	} {
		data := []byte(c.data)
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				Documents("f.yaml", data)
			}
		})
	}
}

// BenchmarkDecode walks documents that expand to 10^9 nodes through aliases
// until the default budget stops them, and a document of aliased unknown
// fields until the problem cap stops it.
func BenchmarkDecode(b *testing.B) {
	var unknown strings.Builder
	unknown.WriteString("name: &m {")
	for i := range 1000 {
		fmt.Fprintf(&unknown, "f%d: 1, ", i)
	}
	unknown.WriteString("}\nkids: [" + strings.Repeat("*m, ", 1000) + "]\n")
	for _, c := range []struct {
		name string
		data []byte
	}{
		{"billion-laughs", laughs(9, 10)},
		{"aliased-unknown-fields", []byte(unknown.String())},
		{"nesting-10000", []byte(strings.Repeat("{kids: [", 5000) + strings.Repeat("]}", 5000))},
	} {
		b.Run(c.name, func(b *testing.B) {
			roots, errs := Documents("f.yaml", c.data)
			if len(errs) > 0 || len(roots) != 1 {
				b.Fatal(errs)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, errs := Decode("f.yaml", roots[0], &fuzzDoc{}, Options{}); len(errs) == 0 {
					b.Fatal("no problem")
				}
			}
		})
	}
}
