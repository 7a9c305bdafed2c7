package strictyaml_test

import (
	"fmt"
	"os"
	"regexp"
	"time"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// A rule file: every document decoded, positions used by a check after
// decoding, all problems reported in line order.
func ExampleDecode() {
	type cell struct {
		Name   string   `yaml:"name"`
		Shards []string `yaml:"shards"`
	}
	type cellMap struct {
		Kind    string `yaml:"kind"`
		Version int64  `yaml:"version"`
		Cells   []cell `yaml:"cells"`
	}
	data := []byte(`kind: CellMap
version: "3"
cells:
  - {name: a0, shards: ["0-4"], state: active}
  - {name: a1, shards: 5-9}
`)
	roots, errs := strictyaml.Documents("rules.yaml", data)
	for _, root := range roots {
		var cm cellMap
		pos, probs := strictyaml.Decode("rules.yaml", root, &cm, strictyaml.Options{})
		errs = append(errs, probs...)
		for i, c := range cm.Cells {
			if c.Name == "a1" {
				path := fmt.Sprintf("cells[%d].name", i)
				errs.Addf("rules.yaml", pos.Line(path), path, "cell %s is retired", c.Name)
			}
		}
	}
	errs.Sort()
	fmt.Println(errs)
	// Output:
	// rules.yaml:2: version: must be an integer, not the string "3"
	// rules.yaml:4: cells[0].state: unknown field (known: name, shards)
	// rules.yaml:5: cells[1].shards: must be a list, not the string "5-9"
	// rules.yaml:5: cells[1].name: cell a1 is retired
}

// duration is a field type that parses its own text.
type duration time.Duration

func (d *duration) ParseScalar(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("must be a duration like 500ms or 10s, not %q", s)
	}
	*d = duration(v)
	return nil
}

// A configuration file: nulls keep defaults, ${VAR} references are expanded
// in the Scalar hook and count as substituted, so that a number may come from
// the environment while a quoted number in the file is still refused.
func ExampleOptions_scalar() {
	type pipeline struct {
		Workers   int      `yaml:"workers"`
		FetchSize int      `yaml:"fetchSize"`
		HoldDelay duration `yaml:"holdDelay"`
		MaxHeld   int      `yaml:"maxHeld"`
	}
	type config struct {
		Pipeline pipeline `yaml:"pipeline"`
	}
	os.Setenv("EXAMPLE_WORKERS", "12")
	ref := regexp.MustCompile(`^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$`)
	opts := strictyaml.Options{NullIsZero: true, Scalar: func(s strictyaml.Scalar) (string, bool, error) {
		m := ref.FindStringSubmatch(s.Node.Value)
		if m == nil {
			return s.Node.Value, false, nil
		}
		v, ok := os.LookupEnv(m[1])
		if !ok {
			return "", false, fmt.Errorf("environment variable %s is not set", m[1])
		}
		return v, true, nil
	}}
	data := []byte(`pipeline:
  workers: ${EXAMPLE_WORKERS}
  fetchSize: "64"
  holdDelay: 5
  maxHeld:
`)
	roots, errs := strictyaml.Documents("bridge.yaml", data)
	c := config{Pipeline: pipeline{MaxHeld: 1000}}
	pos, probs := strictyaml.Decode("bridge.yaml", roots[0], &c, opts)
	errs = append(errs, probs...)
	fmt.Println(c.Pipeline.Workers, c.Pipeline.MaxHeld, pos.Present("pipeline.maxHeld"))
	fmt.Println(errs)
	// Output:
	// 12 1000 false
	// bridge.yaml:3: pipeline.fetchSize: must be an integer, not the string "64"
	// bridge.yaml:4: pipeline.holdDelay: must be a duration like 500ms or 10s, not "5"
}
