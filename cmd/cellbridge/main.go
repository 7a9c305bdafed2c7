// Command cellbridge routes message-queue events to the cell that owns them.
//
// main.go only dispatches: each subcommand lives in its own file and
// registers itself in commands from an init function; the bridge itself is
// built by package internal/app.
//
// Exit codes (stable, scripts depend on them):
//
//	0  success (also for -h)
//	1  invalid input (bad rules, bad config, unknown topic) or a runtime failure
//	2  usage error (unknown command, bad flags, missing arguments)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strings"
	"syscall"
)

// version is the build's version, set with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes returned by realMain and by every command's run function.
const (
	exitOK    = 0
	exitError = 1 // invalid input or failure
	exitUsage = 2 // the command line itself is wrong
)

// runFunc executes a command with the positional arguments left after flag
// parsing and returns an exit code (exitOK, exitError, exitUsage). ctx is
// cancelled on SIGINT/SIGTERM.
type runFunc func(ctx context.Context, args []string, stdout, stderr io.Writer) int

// command is one subcommand.
type command struct {
	name    string // as typed on the command line
	summary string // one line for `cellbridge -h`
	usage   string // full help text printed by `cellbridge NAME -h`, before the flag defaults
	// flags registers the command's flags on fs, a new set for every call,
	// and returns the function that runs the command with their values.
	flags func(fs *flag.FlagSet) runFunc
}

// commands is the registry, filled by the init functions of the command files.
var commands = map[string]*command{}

// register adds c to commands; a duplicate name is a programming error.
func register(c *command) {
	if _, dup := commands[c.name]; dup {
		panic("cellbridge: command registered twice: " + c.name)
	}
	commands[c.name] = c
}

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

// realMain runs the command line args (without the program name) and returns
// the process exit code. It never calls os.Exit.
func realMain(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if len(args) == 0 {
		printMainUsage(stderr)
		return exitUsage
	}
	name := args[0]
	switch name {
	case "-h", "-help", "--help", "help":
		if name == "help" && len(args) > 1 {
			if c, ok := commands[args[1]]; ok {
				printCommandUsage(stdout, c)
				return exitOK
			}
			fmt.Fprintf(stderr, "cellbridge: unknown command %q\n", args[1])
			return exitUsage
		}
		printMainUsage(stdout)
		return exitOK
	case "-version", "--version", "version":
		fmt.Fprintf(stdout, "cellbridge %s (%s)\n", version, runtime.Version())
		return exitOK
	}
	c, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "cellbridge: unknown command %q\n", name)
		printMainUsage(stderr)
		return exitUsage
	}

	fs, run := c.flagSet()
	fs.SetOutput(stderr)
	fs.Usage = func() {} // usage is printed below, once, to the right stream
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printCommandUsage(stdout, c)
			return exitOK
		}
		// flag has already printed the error itself.
		fmt.Fprintf(stderr, "run 'cellbridge %s -h' for usage\n", c.name)
		return exitUsage
	}
	return run(ctx, fs.Args(), stdout, stderr)
}

// flagSet returns a new flag set with the command's flags, and the function
// that runs the command with them.
func (c *command) flagSet() (*flag.FlagSet, runFunc) {
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	return fs, c.flags(fs)
}

func printMainUsage(w io.Writer) {
	fmt.Fprintf(w, "cellbridge %s routes message-queue events to the cell that owns them.\n\n", version)
	fmt.Fprintln(w, "Usage: cellbridge COMMAND [flags] [args]")
	fmt.Fprintln(w, "\nCommands:")
	names := make([]string, 0, len(commands))
	width := 0
	for n := range commands {
		names = append(names, n)
		width = max(width, len(n))
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-*s  %s\n", width, n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'cellbridge COMMAND -h' for a command's flags; 'cellbridge -version' for the version.")
	fmt.Fprintln(w, "Exit codes: 0 ok, 1 invalid input or failure, 2 usage error.")
}

func printCommandUsage(w io.Writer, c *command) {
	fmt.Fprintln(w, strings.TrimRight(c.usage, "\n"))
	fs, _ := c.flagSet()
	hasFlags := false
	fs.VisitAll(func(*flag.Flag) { hasFlags = true })
	if hasFlags {
		fmt.Fprintln(w, "\nFlags:")
		fs.SetOutput(w)
		fs.PrintDefaults()
	}
}

// usageError prints msg and a pointer to the command's help, and returns
// exitUsage; commands use it for bad positional arguments.
func usageError(stderr io.Writer, c string, format string, a ...any) int {
	fmt.Fprintf(stderr, "cellbridge %s: %s\n", c, fmt.Sprintf(format, a...))
	fmt.Fprintf(stderr, "run 'cellbridge %s -h' for usage\n", c)
	return exitUsage
}
