package main

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/models"
	"github.com/influxdata/toml"
	"github.com/influxdata/toml/ast"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/hostconf"
)

// defaultPlugins are the plugin tables a plugin file may hold.
var defaultPlugins = []string{"outputs.omnicore", "inputs.omnicore"}

// loadedPlugin is the one plugin of a plugin file, built by Telegraf's config
// loader: data_format is applied (SetSerializer, SetParser, SetParserFunc),
// secret-store references are linked, environment variables are expanded the
// way telegraf.conf expands them (and a "$" that is not one stays literal),
// and options the plugin does not know are rejected.
type loadedPlugin struct {
	kind     string // "inputs" or "outputs"
	name     string // "omnicore"
	alias    string
	logLevel string // the table's log_level, "" when unset
	input    telegraf.Input
	output   telegraf.Output
	// host are this program's own options ([telegraf_omnicore]).
	host hostconf.Section
}

func (p *loadedPlugin) id() string { return p.kind + "." + p.name }

// loadPluginFile loads path, which must hold exactly one plugin table of
// allowed ("outputs.omnicore", ...), optionally with secret stores.
func loadPluginFile(path string, allowed []string) (*loadedPlugin, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the plugin file: %w", err)
	}
	data, host, err := hostconf.Split(data)
	if err != nil {
		return nil, err
	}
	if err := checkTopLevel(data, allowed); err != nil {
		return nil, err
	}

	c := config.NewConfig()
	c.Agent.Quiet = true // no "Loading config" line: main logs its own
	if err := c.LoadConfigData(data, path); err != nil {
		if ferr := unknownFormatError(err, data); ferr != nil {
			return nil, ferr
		}
		if strings.Contains(err.Error(), "undefined but requested") {
			return nil, fmt.Errorf("%w; this program runs only %s, other plugins belong in telegraf.conf", err, tableList(allowed))
		}
		return nil, err
	}
	if err := c.LinkSecrets(); err != nil {
		return nil, fmt.Errorf("linking secrets: %w", err)
	}

	var found []*loadedPlugin
	var names []string
	for _, ri := range c.Inputs {
		found = append(found, &loadedPlugin{kind: "inputs", name: ri.Config.Name, alias: ri.Config.Alias, logLevel: ri.Config.LogLevel, input: ri.Input})
		names = append(names, "[[inputs."+ri.Config.Name+"]]")
		if err := checkInputOptions(ri.Config); err != nil {
			return nil, err
		}
	}
	for _, ro := range c.Outputs {
		found = append(found, &loadedPlugin{kind: "outputs", name: ro.Config.Name, alias: ro.Config.Alias, logLevel: ro.Config.LogLevel, output: ro.Output})
		names = append(names, "[[outputs."+ro.Config.Name+"]]")
		if err := checkOutputOptions(ro.Config); err != nil {
			return nil, err
		}
	}
	for _, rp := range c.Processors {
		names = append(names, "[[processors."+rp.Config.Name+"]]")
	}
	for _, ra := range c.Aggregators {
		names = append(names, "[[aggregators."+ra.Config.Name+"]]")
	}
	switch {
	case len(names) == 0:
		return nil, fmt.Errorf("the plugin file holds no plugin table; it must hold exactly one %s table", tableList(allowed))
	case len(names) > 1:
		return nil, fmt.Errorf("the plugin file holds %d plugin tables (%s); it must hold exactly one %s table: run one telegraf-omnicore per plugin, each with its own file",
			len(names), strings.Join(names, ", "), tableList(allowed))
	case len(found) != 1 || !slices.Contains(allowed, found[0].id()):
		return nil, fmt.Errorf("the plugin file holds %s; it must hold exactly one %s table", names[0], tableList(allowed))
	}
	p := found[0]
	p.host = host
	if p.kind == "inputs" && (host.Set || len(host.Legacy) > 0) {
		return nil, fmt.Errorf("%s: [%s] and the spool options %w", p.id(), hostconf.Table, hostconf.ErrOnInput)
	}
	if err := host.Options.Check(); err != nil {
		return nil, err
	}
	if p.logLevel != "" {
		if _, err := parseLogLevel(p.logLevel); err != nil {
			return nil, fmt.Errorf("%s: log_level: %w", p.id(), err)
		}
	}
	return p, nil
}

// checkTopLevel rejects the telegraf.conf tables that would silently do
// nothing in a plugin file: [agent], [global_tags] and [tags]. Secret stores
// are fine: the plugin's secrets may reference them.
func checkTopLevel(data []byte, allowed []string) error {
	tbl, err := toml.Parse(data)
	if err != nil {
		// Telegraf's loader reports syntax errors (after expanding
		// environment variables, which may be what makes the file valid).
		return nil //nolint:nilerr // reported by the loader
	}
	for name, v := range tbl.Fields {
		switch name {
		case "inputs", "outputs", "processors", "aggregators", "secretstores":
		case "agent", "global_tags", "tags":
			line := 0
			if t, ok := v.(*ast.Table); ok {
				line = t.Line
			}
			return fmt.Errorf("line %d: [%s] has no effect in a plugin file; set agent options and global tags in telegraf.conf (the plugin file holds one %s table)",
				line, name, tableList(allowed))
		}
	}
	return nil
}

// Options the config loader accepts on every plugin table but that only the
// Telegraf agent applies. In a plugin file nothing would apply them, so they
// are rejected with a pointer to where they belong (log_level and alias are
// honoured).
func checkInputOptions(c *models.InputConfig) error {
	if c.Interval != 0 {
		// The one agent option that has a working counterpart here.
		return fmt.Errorf("inputs.%s: interval has no effect in a plugin file; to gather the statistics on Telegraf's clock, "+
			"set signal = \"STDIN\" on the [[inputs.execd]] block that runs this program (and interval there, to differ from the agent's); "+
			"without it they are gathered every -poll_interval (10s)", c.Name)
	}
	var set []string
	add := func(cond bool, name string) {
		if cond {
			set = append(set, name)
		}
	}
	add(c.Precision != 0, "precision")
	add(c.CollectionJitter != 0, "collection_jitter")
	add(c.CollectionOffset != 0, "collection_offset")
	add(c.StartupErrorBehavior != "", "startup_error_behavior")
	add(c.TimeSource != "", "time_source")
	add(c.MeasurementPrefix != "", "name_prefix")
	add(c.MeasurementSuffix != "", "name_suffix")
	add(c.NameOverride != "", "name_override")
	add(len(c.Tags) > 0, "tags")
	add(c.Filter.IsActive(), "metric filters (namepass, tagpass, fieldinclude, ...)")
	return agentOptionsError("inputs."+c.Name, "[[inputs.execd]]", set)
}

func checkOutputOptions(c *models.OutputConfig) error {
	var set []string
	add := func(cond bool, name string) {
		if cond {
			set = append(set, name)
		}
	}
	add(c.FlushInterval != 0, "flush_interval")
	add(c.FlushJitter != 0, "flush_jitter")
	add(c.MetricBufferLimit != 0, "metric_buffer_limit")
	add(c.MetricBatchSize != 0, "metric_batch_size (use the -batch_size flag)")
	add(c.StartupErrorBehavior != "", "startup_error_behavior")
	add(c.NamePrefix != "", "name_prefix")
	add(c.NameSuffix != "", "name_suffix")
	add(c.NameOverride != "", "name_override")
	add(c.Filter.IsActive(), "metric filters (namepass, tagpass, fieldinclude, ...)")
	return agentOptionsError("outputs."+c.Name, "[[outputs.execd]]", set)
}

func agentOptionsError(plugin, execd string, set []string) error {
	if len(set) == 0 {
		return nil
	}
	return fmt.Errorf("%s: %s only work in telegraf.conf: set them on the %s block that runs this program",
		plugin, strings.Join(set, ", "), execd)
}

func tableList(allowed []string) string {
	parts := make([]string, 0, len(allowed))
	for _, a := range allowed {
		parts = append(parts, "[["+a+"]]")
	}
	return strings.Join(parts, " or ")
}

// errUsage marks command-line errors.
var errUsage = errors.New("usage")
