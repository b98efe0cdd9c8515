package emulator

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"
)

// ProvisioningFile is the file in the state directory that holds the
// registries, devices, bindings and config versions.
const ProvisioningFile = "provisioning.json"

// WithStateDir keeps the provisioning in dir/provisioning.json: read at
// Start (when it exists), written after every change (registries, devices,
// keys, bindings, blocking, configs). Received messages, states, connections
// and config acknowledgements since the last change are not saved.
func WithStateDir(dir string) Option { return func(c *config) { c.stateDir = dir } }

// savedState is the provisioning file's content; its own shape, versioned,
// so that KORE's API can change without breaking saved states.
type savedState struct {
	Format       int             `json:"format"`
	Subscription string          `json:"subscription"`
	NextNumID    int64           `json:"next_num_id"`
	Registries   []savedRegistry `json:"registries"`
}

type savedRegistry struct {
	ID       string           `json:"id"`
	Created  time.Time        `json:"created"`
	Updated  time.Time        `json:"updated"`
	Settings RegistrySettings `json:"settings"`
	Devices  []savedDevice    `json:"devices"`
}

type savedDevice struct {
	ID         string        `json:"id"`
	NumID      int64         `json:"num_id"`
	Gateway    bool          `json:"gateway,omitempty"`
	AuthMethod AuthMethod    `json:"auth_method,omitempty"`
	Blocked    bool          `json:"blocked,omitempty"`
	Keys       []savedKey    `json:"keys,omitempty"`
	BoundTo    []string      `json:"bound_to,omitempty"`
	Meta       DeviceMeta    `json:"meta"`
	Created    time.Time     `json:"created"`
	Updated    time.Time     `json:"updated"`
	Configs    []savedConfig `json:"configs,omitempty"` // oldest first; the last is the latest
	AckedVer   int           `json:"config_acked_version,omitempty"`
	Acked      time.Time     `json:"config_acked,omitzero"`
}

type savedKey struct {
	Format    string    `json:"format"`
	Algorithm string    `json:"algorithm"`
	PEM       string    `json:"pem"`
	Expires   time.Time `json:"expires,omitzero"`
}

type savedConfig struct {
	Version int       `json:"version"`
	Payload []byte    `json:"payload"`
	Updated time.Time `json:"updated"`
	Acked   time.Time `json:"acked,omitzero"`
}

const savedFormat = 1

// SavedSubscription reads the subscription of the provisioning saved in dir;
// ok is false when there is none yet.
func SavedSubscription(dir string) (sub string, ok bool, err error) {
	st, err := readSaved(dir)
	if err != nil || st == nil {
		return "", false, err
	}
	return st.Subscription, true, nil
}

func readSaved(dir string) (*savedState, error) {
	path := filepath.Join(dir, ProvisioningFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var st savedState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if st.Format != savedFormat {
		return nil, fmt.Errorf("%s: format %d, this emulator reads %d", path, st.Format, savedFormat)
	}
	return &st, nil
}

// load restores the saved provisioning, if any, into a server that has none.
func (s *Server) load() error {
	st, err := readSaved(s.stateDir)
	if err != nil || st == nil {
		return err
	}
	if st.Subscription != s.subscription {
		return fmt.Errorf("%s in %s is for subscription %q, the server runs %q", ProvisioningFile, s.stateDir, st.Subscription, s.subscription)
	}
	s.nextNumID = st.NextNumID
	for _, sr := range st.Registries {
		reg := &registry{id: sr.ID, created: sr.Created, updated: sr.Updated, settings: sr.Settings, devices: map[string]*device{}}
		for _, sd := range sr.Devices {
			dev, err := sd.restore()
			if err != nil {
				return fmt.Errorf("%s: registry %q: %w", ProvisioningFile, sr.ID, err)
			}
			reg.devices[sd.ID] = dev
		}
		s.registries[sr.ID] = reg
	}
	return nil
}

func (sd savedDevice) restore() (*device, error) {
	d := Device{ID: sd.ID, Gateway: sd.Gateway, AuthMethod: sd.AuthMethod, Blocked: sd.Blocked}
	for _, k := range sd.Keys {
		d.PublicKeys = append(d.PublicKeys, PublicKey{Format: k.Format, Algorithm: k.Algorithm, PEM: []byte(k.PEM), Expires: k.Expires})
	}
	keys, pubs, err := parseKeys(d.ID, d.PublicKeys)
	if err != nil {
		return nil, err
	}
	d.PublicKeys = pubs
	dev := &device{Device: d, keys: keys, numID: sd.NumID, meta: sd.Meta, created: sd.Created, updated: sd.Updated, boundTo: map[string]bool{}}
	for _, gw := range sd.BoundTo {
		dev.boundTo[gw] = true
	}
	for _, c := range sd.Configs {
		dev.config.history = append(dev.config.history, ConfigVersion(c))
	}
	if n := len(dev.config.history); n > 0 {
		last := dev.config.history[n-1]
		dev.config.version, dev.config.payload, dev.config.updated = last.Version, last.Payload, last.Updated
	}
	dev.config.ackedVersion, dev.config.acked = sd.AckedVer, sd.Acked
	return dev, nil
}

// save writes the provisioning to the state directory (atomically: a
// temporary file renamed over the old one). Concurrent saves may finish in
// any order; a snapshot older than the one on disk is not written.
func (s *Server) save() error {
	if s.stateDir == "" {
		return nil
	}
	s.mu.Lock()
	s.saveGen++
	gen := s.saveGen
	st := s.snapshotLocked()
	s.mu.Unlock()
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotSaved, err)
	}
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	if gen <= s.savedGen {
		return nil
	}
	if err := writeFileAtomic(filepath.Join(s.stateDir, ProvisioningFile), data); err != nil {
		s.log.Error("provisioning not saved", "error", err)
		return fmt.Errorf("%w: %v", ErrNotSaved, err)
	}
	s.savedGen = gen
	return nil
}

func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".provisioning-*.tmp")
	if err != nil {
		return err
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
	}
	return err
}

func (s *Server) snapshotLocked() savedState {
	st := savedState{Format: savedFormat, Subscription: s.subscription, NextNumID: s.nextNumID}
	for _, reg := range s.registries {
		sr := savedRegistry{ID: reg.id, Created: reg.created, Updated: reg.updated, Settings: reg.settings}
		for _, d := range reg.devices {
			sd := savedDevice{
				ID: d.ID, NumID: d.numID, Gateway: d.Gateway, AuthMethod: d.AuthMethod, Blocked: d.Blocked,
				Meta: d.meta.clone(), Created: d.created, Updated: d.updated,
				AckedVer: d.config.ackedVersion, Acked: d.config.acked,
			}
			for _, k := range d.PublicKeys {
				sd.Keys = append(sd.Keys, savedKey{Format: k.Format, Algorithm: k.Algorithm, PEM: string(k.PEM), Expires: k.Expires})
			}
			for gw := range d.boundTo {
				sd.BoundTo = append(sd.BoundTo, gw)
			}
			sort.Strings(sd.BoundTo)
			for _, c := range d.config.history {
				sd.Configs = append(sd.Configs, savedConfig(c))
			}
			sr.Devices = append(sr.Devices, sd)
		}
		slices.SortFunc(sr.Devices, func(a, b savedDevice) int { return cmp.Compare(a.ID, b.ID) })
		st.Registries = append(st.Registries, sr)
	}
	slices.SortFunc(st.Registries, func(a, b savedRegistry) int { return cmp.Compare(a.ID, b.ID) })
	return st
}
