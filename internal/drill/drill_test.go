package drill

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/rulesdir"
	"github.com/cellbridge/cellbridge/router"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const exampleRules = "../../deploy/rules"

func loadExample(t *testing.T) (map[string][]byte, *router.Table) {
	t.Helper()
	files, err := rulesdir.ReadRuleFiles(exampleRules)
	if err != nil {
		t.Fatal(err)
	}
	tbl, err := router.Load(exampleRules)
	if err != nil {
		t.Fatal(err)
	}
	return files, tbl
}

func mustLoad(t *testing.T, files map[string][]byte) *router.Table {
	t.Helper()
	tbl, err := rulesdir.LoadFiles(t.TempDir(), files)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

func TestEditCellMap(t *testing.T) {
	files, t0 := loadExample(t)
	v0 := t0.Version()
	owners := rulesdir.Owners(t0)
	for s := 22; s <= 32; s++ {
		owners[s] = "rz10"
	}
	moved, err := rulesdir.EditCellMap(files, rulesdir.CellMapEdit{Version: v0 + 2, Owner: owners, Blocked: []router.Range{}})
	if err != nil {
		t.Fatal(err)
	}
	t2 := mustLoad(t, moved)
	if t2.Version() != v0+2 || t2.Owner(22) != "rz10" || t2.Owner(32) != "rz10" || t2.Owner(21) != "rz00" || t2.Owner(33) != t0.Owner(33) {
		t.Errorf("moved: version %d, owners 21..33: %s %s %s %s", t2.Version(), t2.Owner(21), t2.Owner(22), t2.Owner(32), t2.Owner(33))
	}
	d := router.Diff(t0, t2)
	if d.BlockedList() != `["22-32"]` {
		t.Errorf("diff blocks %s", d.BlockedList())
	}
	blocked, err := rulesdir.EditCellMap(files, rulesdir.CellMapEdit{Version: v0 + 1, Blocked: d.Block})
	if err != nil {
		t.Fatal(err)
	}
	t1 := mustLoad(t, blocked)
	if !t1.IsBlocked(22) || !t1.IsBlocked(32) || t1.IsBlocked(21) || t1.Owner(22) != "rz00" {
		t.Errorf("blocked table: %v, owner of 22 %s", t1.Blocked(), t1.Owner(22))
	}
	// The comments of the file survive the edit.
	var cellmap string
	for name, b := range blocked {
		if strings.Contains(string(b), "kind: CellMap") {
			cellmap = name
		}
	}
	if !strings.Contains(string(blocked[cellmap]), "# Bump on every change") {
		t.Errorf("comments lost:\n%s", blocked[cellmap])
	}

	// Down without fixing the failovers does not validate; with the fixes
	// it does, and the cell's shards go to its failover.
	down, err := rulesdir.EditCellMap(moved, rulesdir.CellMapEdit{Version: v0 + 3, State: map[string]string{"rz10": router.StateDown}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rulesdir.LoadFiles(t.TempDir(), down); err == nil {
		t.Error("a failover to a down cell validated")
	}
	fixes := failoverFixes(t2, "rz10")
	if len(fixes) != 1 || fixes["gz00"] != "rz01" {
		t.Errorf("fixes %v", fixes)
	}
	down, err = rulesdir.EditCellMap(moved, rulesdir.CellMapEdit{Version: v0 + 3, State: map[string]string{"rz10": router.StateDown}, Failover: fixes})
	if err != nil {
		t.Fatal(err)
	}
	t3 := mustLoad(t, down)
	if t3.Serving(22) != "rz01" || t3.Serving(99) != "rz01" || t3.Serving(0) != "rz00" {
		t.Errorf("serving after failover: 22→%s 99→%s 0→%s", t3.Serving(22), t3.Serving(99), t3.Serving(0))
	}
	if _, err := rulesdir.EditCellMap(files, rulesdir.CellMapEdit{State: map[string]string{"nope": "down"}}); err == nil {
		t.Error("unknown cell accepted")
	}
}

// scenario builds the tables and phases of a drill over the example rules:
// v1 start, v2 blocks 22-32, v3 moves them to rz10, v4 rz10 down.
type scenario struct {
	in   checkInput
	rep  *Report
	base time.Time
	n    int
	seq  map[string]int
}

func newScenario(t *testing.T) *scenario {
	files, t0 := loadExample(t)
	v0 := t0.Version()
	owners := rulesdir.Owners(t0)
	for s := 22; s <= 32; s++ {
		owners[s] = "rz10"
	}
	f1, _ := rulesdir.EditCellMap(files, rulesdir.CellMapEdit{Version: v0 + 1, Blocked: []router.Range{{From: 22, To: 32}}})
	f2, _ := rulesdir.EditCellMap(files, rulesdir.CellMapEdit{Version: v0 + 2, Owner: owners, Blocked: []router.Range{}})
	t2 := mustLoad(t, f2)
	f3, _ := rulesdir.EditCellMap(f2, rulesdir.CellMapEdit{Version: v0 + 3, State: map[string]string{"rz10": router.StateDown}, Failover: failoverFixes(t2, "rz10")})
	base := time.Now()
	sec := func(n int) time.Time { return base.Add(time.Duration(n) * time.Second) }
	s := &scenario{base: base, seq: map[string]int{}, rep: &Report{}}
	s.in = checkInput{
		topic:  "orders",
		msgIDs: map[string]string{},
		tables: map[int64]*router.Table{v0: t0, v0 + 1: mustLoad(t, f1), v0 + 2: t2, v0 + 3: mustLoad(t, f3)},
		phases: []*Phase{{Version: v0}, {Version: v0 + 1, Effective: sec(10)}, {Version: v0 + 2, Written: sec(19), Effective: sec(20)},
			{Version: v0 + 3, Effective: sec(30)}},
		blocked:        []router.Range{{From: 22, To: 32}},
		blockEffective: sec(10), unblockWritten: sec(19),
		down: "rz10", failVersion: v0 + 3, failEffective: sec(30),
		slack: 2 * time.Second,
	}
	return s
}

// keyOf is a key of shard s (digits [-3:-1] of the example rules).
func keyOf(s int) string { return "2088000000000" + twoDigits(s) + "7" }

func twoDigits(s int) string { return string([]byte{byte('0' + s/10), byte('0' + s%10)}) }

// send records one event of shard s published at second pub and, unless
// cell is "-", its arrival in cell at second at under version v.
func (s *scenario) send(shard int, pub, at float64, cell string, v int64) *Event {
	s.n++
	k := keyOf(shard)
	s.seq[k]++
	e := &Event{ID: "e" + twoDigits(s.n/100) + twoDigits(s.n%100), Key: k, Seq: s.seq[k], Shard: shard,
		Published: s.base.Add(time.Duration(pub * float64(time.Second)))}
	e.Stored = e.Published
	s.in.events = append(s.in.events, e)
	s.in.msgIDs[e.ID] = "ORDERS:" + e.ID
	if cell != "-" {
		s.arrive(e, cell, at, v)
	}
	return e
}

func (s *scenario) arrive(e *Event, cell string, at float64, v int64) {
	s.in.arrivals = append(s.in.arrivals, Arrival{Cell: cell, Stream: "CELL_" + strings.ToUpper(cell), ID: e.ID, Key: e.Key, Seq: e.Seq,
		MsgID: "ORDERS:" + e.ID, Version: v, StreamSeq: uint64(len(s.in.arrivals) + 1),
		Stored: s.base.Add(time.Duration(at * float64(time.Second)))})
}

// clean is a drill that kept every guarantee: shard 25 moves rz00 → (held)
// → rz10 → rz01 (failover), shard 5 stays in rz00 and flows while blocked.
func (s *scenario) clean() {
	s.send(25, 1, 1.1, "rz00", 1)
	s.send(5, 1, 1.1, "rz00", 1)
	s.send(25, 11, 20.1, "rz10", 3) // held during the block, released to the new owner
	s.send(5, 11, 11.1, "rz00", 2)  // the other shards flow while blocked
	s.send(25, 12, 20.2, "rz10", 3)
	s.send(25, 21, 21.1, "rz10", 3)
	s.send(25, 31, 31.1, "rz01", 4)
	s.send(70, 31, 31.1, "rz01", 4)
}

func (s *scenario) check() *Report {
	checkArrivals(s.in, s.rep)
	return s.rep
}

func TestChecksClean(t *testing.T) {
	s := newScenario(t)
	s.clean()
	rep := s.check()
	if !rep.OK() {
		t.Fatalf("violations on a clean run: %+v", rep.Violations)
	}
	if rep.KeysMoved != 1 || rep.Switch.OthersArrived != 1 || rep.Arrived != 8 || s.in.phases[2].PerCell["rz10"] != 3 {
		t.Errorf("report: moved %d, others %d, arrived %d, phases %+v", rep.KeysMoved, rep.Switch.OthersArrived, rep.Arrived, s.in.phases[2])
	}
}

// TestChecksCatchViolations breaks each guarantee once and expects exactly
// that kind of violation: a check that never fires proves nothing.
func TestChecksCatchViolations(t *testing.T) {
	for _, tc := range []struct {
		kind   string
		mutate func(s *scenario)
	}{
		{KindBlockedForwarded, func(s *scenario) { s.send(26, 12, 12.1, "rz00", 2) }}, // forwarded under the blocking version
		{KindBlockedForwarded, func(s *scenario) { s.send(26, 9, 15, "rz00", 1) }},    // decided before, arrived long after the block
		{KindLost, func(s *scenario) { s.send(5, 21, 0, "-", 0) }},
		{KindDuplicate, func(s *scenario) { e := s.send(5, 21, 21.1, "rz00", 3); s.arrive(e, "rz00", 21.2, 3) }},
		{KindDuplicate, func(s *scenario) {
			s.send(6, 21, 21.1, "rz00", 3)
			s.in.arrivals[len(s.in.arrivals)-1].MsgID = s.in.arrivals[0].MsgID
			s.in.msgIDs[s.in.events[len(s.in.events)-1].ID] = ""
		}},
		{KindMsgID, func(s *scenario) {
			s.send(6, 21, 21.1, "rz00", 3)
			s.in.msgIDs[s.in.events[len(s.in.events)-1].ID] = "ORDERS:999"
		}},
		{KindOrder, func(s *scenario) {
			a := s.send(7, 21, 21.2, "rz00", 3)
			b := s.send(7, 21, 0, "-", 0)
			_ = a
			s.arrive(b, "rz00", 21.1, 3) // stored before its predecessor, in another stream order
		}},
		{KindWrongCell, func(s *scenario) { s.send(40, 21, 21.1, "rz00", 3) }},
		{KindDownCell, func(s *scenario) { s.send(80, 29, 33, "rz10", 3) }},
		{KindDLQ, func(s *scenario) { s.send(8, 21, 0, "-", 0); s.arrive(s.in.events[len(s.in.events)-1], "", 21.1, 0) }},
		{KindUnknownVersion, func(s *scenario) { s.send(9, 21, 21.1, "rz00", 99) }},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			s := newScenario(t)
			s.clean()
			tc.mutate(s)
			rep := s.check()
			if rep.Count(tc.kind) == 0 {
				t.Errorf("no %s violation; got %+v", tc.kind, rep.Violations)
			}
		})
	}
	t.Run(KindOthersStalled, func(t *testing.T) {
		s := newScenario(t)
		s.send(25, 1, 1.1, "rz00", 1)
		s.send(25, 11, 20.1, "rz10", 3)
		if rep := s.check(); rep.Count(KindOthersStalled) == 0 {
			t.Errorf("no %s violation; got %+v", KindOthersStalled, rep.Violations)
		}
	})
}
