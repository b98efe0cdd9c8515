package check

import (
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/toml"
	"github.com/influxdata/toml/ast"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/hostconf"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
	inomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/inputs/omnicore"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// plugin is one omnicore table of a checked file.
type plugin struct {
	file    string
	table   string // "outputs.omnicore" or "inputs.omnicore"
	alias   string
	opts    gateway.Options
	pool    []pool.GatewayOptions
	devices []string
	// output is set for an output, for its spool settings.
	output *outomni.OmniCore
	// host is the file's [telegraf_omnicore] table (the spool's options).
	host hostconf.Options
	// initErr is the plugin's Init error: an option the plugin refuses.
	initErr error
}

func (p *plugin) name() string {
	n := "[[" + p.table + "]]"
	if p.alias != "" {
		n += " " + p.alias
	}
	return n + " in " + p.file
}

// load loads the omnicore tables of path with Telegraf's config loader, as
// the execd program and Telegraf load them: environment variables expanded,
// secrets linked, unknown options rejected. path is a plugin file or a
// telegraf.conf: the loader's input and output filters skip the other
// plugins, and the processors and aggregators (which the loader has no
// filter for, and which this program does not have) are blanked first.
func load(path string) ([]*plugin, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	data, err = withoutProcessors(data)
	if err != nil {
		return nil, err
	}
	// The execd binary's own table, which Telegraf's loader does not know.
	data, host, err := hostconf.Split(data)
	if err != nil {
		return nil, err
	}
	if err := host.Options.Check(); err != nil {
		return nil, err
	}
	c := config.NewConfig()
	c.Agent.Quiet = true
	c.InputFilters = []string{"omnicore"}
	c.OutputFilters = []string{"omnicore"}
	if err := c.LoadConfigData(data, path); err != nil {
		return nil, err
	}
	if err := c.LinkSecrets(); err != nil {
		return nil, fmt.Errorf("linking secrets: %w", err)
	}
	var out []*plugin
	for _, ro := range c.Outputs {
		o, ok := ro.Output.(*outomni.OmniCore)
		if !ok {
			continue
		}
		out = append(out, &plugin{
			file: path, table: "outputs.omnicore", alias: ro.Config.Alias,
			opts: o.Options, pool: o.Gateways, devices: o.Devices, output: o, host: host.Options,
			initErr: o.Init(),
		})
	}
	for _, ri := range c.Inputs {
		in, ok := ri.Input.(*inomni.OmniCore)
		if !ok {
			continue
		}
		out = append(out, &plugin{
			file: path, table: "inputs.omnicore", alias: ri.Config.Alias,
			opts: in.Options, pool: in.Gateways, devices: in.Devices,
			initErr: in.Init(),
		})
	}
	return out, nil
}

// withoutProcessors returns data with the lines of its [[processors.*]] and
// [[aggregators.*]] tables blanked (line numbers kept for the loader's
// errors). The tables' extents come from the TOML parser's header lines:
// a table runs from its header to the next header of any table.
func withoutProcessors(data []byte) ([]byte, error) {
	tbl, err := toml.Parse(data)
	if err != nil {
		return data, nil //nolint:nilerr // the loader reports syntax errors with its context
	}
	type header struct {
		line int
		path string
	}
	var headers []header
	var walk func(path string, t *ast.Table)
	walk = func(path string, t *ast.Table) {
		if path != "" {
			headers = append(headers, header{t.Line, path})
		}
		for k, v := range t.Fields {
			switch x := v.(type) {
			case *ast.Table:
				walk(strings.TrimPrefix(path+"."+k, "."), x)
			case []*ast.Table:
				for _, e := range x {
					walk(strings.TrimPrefix(path+"."+k, "."), e)
				}
			}
		}
	}
	walk("", tbl)
	// An implicit parent ([processors] of [[processors.x]]) shares its
	// child's line: the longest path is the header written there.
	slices.SortFunc(headers, func(a, b header) int {
		if a.line != b.line {
			return a.line - b.line
		}
		return len(b.path) - len(a.path)
	})
	headers = slices.CompactFunc(headers, func(a, b header) bool { return a.line == b.line })
	lines := strings.SplitAfter(string(data), "\n")
	for i, h := range headers {
		top, _, _ := strings.Cut(h.path, ".")
		if top != "processors" && top != "aggregators" {
			continue
		}
		end := len(lines)
		if i+1 < len(headers) {
			end = headers[i+1].line - 1
		}
		for l := h.line - 1; l < end && l < len(lines); l++ {
			if strings.HasSuffix(lines[l], "\n") {
				lines[l] = "\n"
			} else {
				lines[l] = ""
			}
		}
	}
	return []byte(strings.Join(lines, "")), nil
}

// gatewayCheck is one gateway identity named by the checked plugins (the
// top-level gateway of each, and the members of their pools).
type gatewayCheck struct {
	clientID string
	opts     gateway.Options // with this member's gateway_id, private_key and algorithm
	files    []string
	// devices are the devices options of the plugins of this gateway; for a
	// pool, of the plugins whose pool it is first in.
	devices []string
	// pool are the other members of the pool, for trying a device refused
	// here (a pool spreads devices over its members).
	poolOf []string
}

// gatewaysOf lists the gateways of the plugins, each once, in order.
func gatewaysOf(plugins []*plugin) []*gatewayCheck {
	var out []*gatewayCheck
	byID := map[string]*gatewayCheck{}
	add := func(p *plugin, o gateway.Options, devices []string) *gatewayCheck {
		id := omnicore.ClientID(o.SubscriptionID, o.RegistryID, o.GatewayID)
		g, ok := byID[id]
		if !ok {
			g = &gatewayCheck{clientID: id, opts: o}
			byID[id] = g
			out = append(out, g)
		}
		if !slices.Contains(g.files, p.file) {
			g.files = append(g.files, p.file)
		}
		for _, d := range devices {
			if !slices.Contains(g.devices, d) {
				g.devices = append(g.devices, d)
			}
		}
		return g
	}
	for _, p := range plugins {
		top := add(p, p.opts, p.devices)
		for _, m := range p.pool {
			o := p.opts
			o.GatewayID, o.PrivateKey = m.GatewayID, m.PrivateKey
			if m.Algorithm != "" {
				o.Algorithm = m.Algorithm
			}
			g := add(p, o, nil)
			if !slices.Contains(top.poolOf, g.clientID) {
				top.poolOf = append(top.poolOf, g.clientID)
			}
		}
	}
	return out
}
