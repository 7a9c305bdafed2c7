// Command render prints the manifests of a kustomize overlay, for machines
// without kubectl: `go run ./deploy/render deploy/overlays/production`. It
// uses kustomize's Go API, the same code as `kubectl kustomize`.
package main

import (
	"fmt"
	"io"
	"os"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// run renders the overlay named by args[0]; exit codes: 0 ok, 1 the
// overlay does not build, 2 usage.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) != 1 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintln(stderr, "usage: go run ./deploy/render DIR   (e.g. deploy/overlays/single-region)")
		return 2
	}
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), args[0])
	if err == nil {
		var out []byte
		if out, err = m.AsYaml(); err == nil {
			_, err = stdout.Write(out)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "render %s: %v\n", args[0], err)
		return 1
	}
	return 0
}
