// Package strictyaml decodes YAML files into schema structs strictly and
// reports every problem at once as "file:line: field: message". It is the
// one decoder of the rule files (package router) and of the bridge
// configuration file.
//
// yaml.Unmarshal stops at the first error, reports unknown fields without
// their path, forgets lines, and follows aliases without a limit on the
// values they expand to. Here a file is parsed into yaml.Node trees and a
// walker fills the schema from them:
//
//   - Documents parses a file (at most MaxFileBytes) into the root nodes of
//     its non-empty documents; a syntax error becomes one located Problem
//     (SyntaxProblem).
//   - Decode fills a struct from a root node by `yaml` tags. It refuses
//     wrong types, unknown fields (listing the known ones), duplicate keys,
//     merge keys and non-string keys, and bounds the work per document: at
//     most Options.MaxNodes nodes after alias expansion (a "billion laughs"
//     file of a few hundred bytes stops there with "document too large"),
//     Options.MaxDepth levels and Options.MaxProblems problems.
//   - Decode returns Positions, the line of every field path written, so
//     that checks made after decoding (a missing field, a value out of range,
//     two fields that conflict) still name a line: Positions.Present tells
//     `from: 0` from no `from`, Positions.Line finds the line of a path or of
//     its nearest written parent.
//   - Field types that parse themselves (durations, sizes) implement
//     ScalarParser. Options.Scalar lets a caller rewrite each scalar before
//     it is stored: the configuration expands ${VAR} and ${VAR:-default}
//     and reads `file:` secrets there, and marks environment values as
//     substituted, so that an integer field takes "12" from the environment
//     while a quoted "12" in the file is refused.
//   - Field types that take one of several shapes (a word, a list or a
//     mapping) implement Union: the node's kind picks the value decoded.
//   - Problem and Errors are the one problem type: router.Problem and
//     router.Errors are aliases of them.
//
// Messages say what a field must be and what it is instead:
//
//	t.yaml:3: shards: must be an integer, not the string "10"
//	t.yaml:5: globl: unknown field (known: kind, version, shards, global, cells)
//	t.yaml:4: shards: duplicate key (first at line 3)
//	t.yaml:14: pins[79999].cell: document too large (more than 400000 keys and values after expanding aliases)
//
// A rule loader reads every document of a file and validates after
// decoding (see ExampleDecode):
//
//	roots, errs := strictyaml.Documents(name, data)
//	for _, root := range roots {
//		var cm cellMapDoc
//		pos, probs := strictyaml.Decode(name, root, &cm, strictyaml.Options{})
//		errs = append(errs, probs...)
//		if !pos.Present("version") {
//			errs.Addf(name, root.Line, "version", "missing")
//		}
//	}
//	errs.Sort()
//
// A configuration loader lets nulls keep defaults and resolves references in
// a hook (see ExampleOptions_scalar):
//
//	opts := strictyaml.Options{NullIsZero: true, Scalar: func(s strictyaml.Scalar) (string, bool, error) {
//		text, fromEnv, err := expandEnv(s.Node.Value)
//		if err == nil && s.Type == secretType {
//			text, err = readFileSecret(text) // "file:/run/secrets/x" → its content
//		}
//		return text, fromEnv, err
//	}}
//	pos, errs := strictyaml.Decode(file, roots[0], &cfg, opts)
//
// Documents and Decode keep no state between calls and may run
// concurrently; the Errors and Positions they return belong to the caller.
package strictyaml
