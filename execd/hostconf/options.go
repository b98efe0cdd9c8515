// Package hostconf is the execd binary's own part of a plugin file: the
// [telegraf_omnicore] table (the spool's options, which Telegraf built with
// the plugins does not need and the plugins therefore do not know), taken
// out before Telegraf's config loader reads the rest, and the spool
// directory named after the gateway. The binary and `telegraf-omnicore
// check` both read plugin files through it.
package hostconf

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/toml"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

// Table is the plugin file's table of this program's own options: what
// the program does around the plugin (today the output's spool), which
// Telegraf built with the plugin does not need and the plugin therefore
// does not know.
const Table = "telegraf_omnicore"

// Options are the options of the [telegraf_omnicore] table.
type Options struct {
	Spool             bool            `toml:"spool"`
	SpoolDir          string          `toml:"spool_dir"`
	SpoolMaxSize      config.Size     `toml:"spool_max_size"`
	SpoolSyncInterval config.Duration `toml:"spool_sync_interval"`
	SpoolFull         string          `toml:"spool_full"`
}

func DefaultOptions() Options {
	return Options{
		Spool:             true,
		SpoolMaxSize:      config.Size(spool.DefaultMaxSize),
		SpoolSyncInterval: config.Duration(spool.DefaultSyncInterval),
		SpoolFull:         string(spool.Backpressure),
	}
}

// Check validates the options: a bad value is an error at start.
func (o *Options) Check() error {
	switch spool.FullPolicy(o.SpoolFull) {
	case spool.Backpressure, spool.DropOldest:
	default:
		return fmt.Errorf("[%s] spool_full %q must be %q or %q", Table, o.SpoolFull, spool.Backpressure, spool.DropOldest)
	}
	if int64(o.SpoolMaxSize) < spool.MinMaxSize {
		return fmt.Errorf("[%s] spool_max_size %d bytes is below the minimum of %d (16KiB)", Table, int64(o.SpoolMaxSize), spool.MinMaxSize)
	}
	if o.SpoolSyncInterval < 0 {
		return fmt.Errorf("[%s] spool_sync_interval %s must not be negative", Table, time.Duration(o.SpoolSyncInterval))
	}
	return nil
}

// legacyKeys are the host options that earlier versions took inside the
// output's table; they are still accepted there.
var legacyKeys = map[string]bool{"spool": true, "spool_dir": true, "spool_max_size": true, "spool_sync_interval": true, "spool_full": true}

var (
	headerLine = regexp.MustCompile(`^\s*\[\[?\s*([^\]\s]+)\s*\]\]?\s*(#.*)?$`)
	keyLine    = regexp.MustCompile(`^\s*([A-Za-z0-9_-]+)\s*=`)
)

// Section is what Split takes out of a plugin file.
type Section struct {
	Options Options
	Set     bool // the file has a [telegraf_omnicore] table
	// Legacy are the host options found in the output's table, sorted.
	Legacy []string
}

// Split takes the [telegraf_omnicore] table, and the spool
// options an output table holds from earlier versions, out of a plugin
// file: it returns the file for Telegraf's loader (those lines blanked, so
// that the loader's line numbers stay right) and the options. Lines are
// matched as TOML writes them (a table header on its own line, one key per
// line); the options are then decoded as TOML, unknown keys rejected.
// Environment variables in spool_dir are expanded ($VAR, ${VAR}).
func Split(data []byte) ([]byte, Section, error) {
	sec := Section{Options: DefaultOptions()}
	lines := strings.SplitAfter(string(data), "\n")
	var host, legacy strings.Builder
	current, output := "", false
	for i, l := range lines {
		if m := headerLine.FindStringSubmatch(l); m != nil {
			current = m[1]
			output = strings.HasPrefix(strings.TrimSpace(l), "[[outputs.") && strings.Count(current, ".") == 1
		}
		switch {
		case current == Table:
			if headerLine.MatchString(l) && strings.HasPrefix(strings.TrimSpace(l), "[[") {
				return nil, sec, fmt.Errorf("line %d: [%s] is a table, written [%s], not an array of tables", i+1, Table, Table)
			}
			if sec.Set && headerLine.MatchString(l) {
				return nil, sec, fmt.Errorf("line %d: [%s] appears twice", i+1, Table)
			}
			sec.Set = true
			if !headerLine.MatchString(l) {
				host.WriteString(l)
			}
			lines[i] = blank(l)
		case output:
			if m := keyLine.FindStringSubmatch(l); m != nil && legacyKeys[m[1]] {
				sec.Legacy = append(sec.Legacy, m[1])
				legacy.WriteString(l)
				lines[i] = blank(l)
			}
		}
	}
	opts := DefaultOptions()
	hostSet, err := decodeHostOptions(host.String(), &opts)
	if err != nil {
		return nil, sec, fmt.Errorf("[%s]: %w", Table, err)
	}
	legacySet, err := decodeHostOptions(legacy.String(), &opts)
	if err != nil {
		return nil, sec, fmt.Errorf("the output's spool options: %w", err)
	}
	for k := range legacySet {
		if hostSet[k] {
			return nil, sec, fmt.Errorf("%s is set both in [%s] and in the output's table; keep the one in [%s]", k, Table, Table)
		}
	}
	sort.Strings(sec.Legacy)
	opts.SpoolDir = os.ExpandEnv(opts.SpoolDir)
	sec.Options = opts
	return []byte(strings.Join(lines, "")), sec, nil
}

// blank keeps a line's newline only.
func blank(l string) string {
	if strings.HasSuffix(l, "\n") {
		return "\n"
	}
	return ""
}

// decodeHostOptions decodes the key = value lines of text into opts and
// returns the keys set.
func decodeHostOptions(text string, opts *Options) (map[string]bool, error) {
	tbl, err := toml.Parse([]byte(text))
	if err != nil {
		return nil, err
	}
	set := make(map[string]bool, len(tbl.Fields))
	for k := range tbl.Fields {
		set[k] = true
	}
	cfg := toml.DefaultConfig
	cfg.MissingField = func(_ reflect.Type, key string) error {
		return fmt.Errorf("unknown option %q (the options are spool, spool_dir, spool_max_size, spool_sync_interval and spool_full)", key)
	}
	if err := cfg.UnmarshalTable(tbl, opts); err != nil {
		return nil, err
	}
	return set, nil
}

var ErrOnInput = errors.New("has no effect in an input's plugin file: the spool options are the output's")
