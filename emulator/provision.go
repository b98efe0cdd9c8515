package emulator

import (
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Provisioning: the registry as KORE's device-manager API changes it. Every
// change acts on the live connections at once, as it would at the bridge,
// and is saved in the state directory (WithStateDir).

// Errors of the provisioning calls besides ErrNotFound and ErrExists.
var (
	// ErrVersionMismatch: a config update named a version that is not the
	// device's latest.
	ErrVersionMismatch = errors.New("the config's version is not the one to update")
	// ErrNotEmpty: a registry that still has devices cannot be deleted.
	ErrNotEmpty = errors.New("the registry still has devices")
	// ErrNotSaved: the change is made but could not be written to the state directory.
	ErrNotSaved = errors.New("not saved to the state directory")
)

// Bounds of what the emulator keeps per device, as KORE documents them for
// configVersions and states (10 each), and of metadata, as Cloud IoT Core
// documented them (KORE is silent).
const (
	maxConfigVersionsKept = 10
	maxStatesKept         = 10
	maxMetadataPairs      = 500
	maxMetadataKeyBytes   = 128
	maxMetadataBytes      = 256 << 10
)

// DeviceMeta is what KORE's API keeps for a device besides what the bridge
// checks: stored and returned, not acted on (device policies are not
// emulated).
type DeviceMeta struct {
	Metadata map[string]string `json:"metadata,omitempty"`
	LogLevel string            `json:"logLevel,omitempty"` // INFO, ERROR or ""
	Policy   json.RawMessage   `json:"policy,omitempty"`
}

// DeviceSpec is a device as CreateDevice and UpdateDevice take it.
type DeviceSpec struct {
	Device
	Meta DeviceMeta
	// BoundTo lists gateways to bind a new device to (CreateDevice only).
	BoundTo []string
}

// DeviceState is one state message a device sent.
type DeviceState struct {
	Payload []byte
	Time    time.Time
}

// ConfigVersion is one config version of a device.
type ConfigVersion struct {
	Version int
	Payload []byte
	Updated time.Time
	Acked   time.Time // zero until a device acknowledged this version (QoS 1)
}

func (m DeviceMeta) validate() error {
	if len(m.Metadata) > maxMetadataPairs {
		return fmt.Errorf("metadata: %d pairs, at most %d", len(m.Metadata), maxMetadataPairs)
	}
	total := 0
	for k, v := range m.Metadata {
		if k == "" || len(k) > maxMetadataKeyBytes {
			return fmt.Errorf("metadata: key %s must have 1 to %d bytes", trunc(k), maxMetadataKeyBytes)
		}
		for _, c := range []byte(k) {
			if !isLetter(c) && (c < '0' || c > '9') && c != '-' && c != '_' {
				return fmt.Errorf("metadata: key %s may hold letters, digits, - and _ only", trunc(k))
			}
		}
		total += len(k) + len(v)
	}
	if total > maxMetadataBytes {
		return fmt.Errorf("metadata: %d bytes, at most %d", total, maxMetadataBytes)
	}
	return validLogLevel(m.LogLevel)
}

func validLogLevel(l string) error {
	switch l {
	case "", "INFO", "ERROR":
		return nil
	}
	return fmt.Errorf("logLevel %s is not INFO or ERROR", trunc(l))
}

func isLetter(c byte) bool { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') }

func (m DeviceMeta) clone() DeviceMeta {
	return DeviceMeta{Metadata: maps.Clone(m.Metadata), LogLevel: m.LogLevel, Policy: slices.Clone(m.Policy)}
}

// normalizeGateway defaults a gateway's auth method and refuses one on a
// non-gateway.
func normalizeGateway(d *Device) error {
	if !d.Gateway {
		if d.AuthMethod != "" {
			return fmt.Errorf("device %q: only gateways have an auth method", d.ID)
		}
		return nil
	}
	if d.AuthMethod == "" {
		d.AuthMethod = AssociationOnly
	}
	if !d.AuthMethod.needsBinding() && !d.AuthMethod.needsToken() {
		return fmt.Errorf("device %q: unknown auth method %q", d.ID, d.AuthMethod)
	}
	return nil
}

// CreateDevice adds a device (or gateway) to a registry, bound to
// spec.BoundTo. Its keys are parsed now, so a bad PEM fails here rather than
// at CONNECT.
func (s *Server) CreateDevice(registryID string, spec DeviceSpec) error {
	d := spec.Device
	if err := omnicore.ValidateID(d.ID); err != nil {
		return fmt.Errorf("device: %w", err)
	}
	if err := normalizeGateway(&d); err != nil {
		return err
	}
	keys, pubs, err := parseKeys(d.ID, d.PublicKeys)
	if err != nil {
		return err
	}
	if err := spec.Meta.validate(); err != nil {
		return err
	}
	now := time.Now()
	s.mu.Lock()
	reg, ok := s.registries[registryID]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("registry %q: %w", registryID, ErrNotFound)
	}
	if _, ok := reg.devices[d.ID]; ok {
		s.mu.Unlock()
		return fmt.Errorf("device %q in registry %q: %w", d.ID, registryID, ErrExists)
	}
	for _, gw := range spec.BoundTo {
		if err := s.bindableLocked(reg, gw, d); err != nil {
			s.mu.Unlock()
			return err
		}
	}
	s.nextNumID++
	dev := &device{Device: d, keys: keys, numID: s.nextNumID, meta: spec.Meta.clone(), created: now, updated: now, boundTo: map[string]bool{}}
	dev.PublicKeys = pubs
	for _, gw := range spec.BoundTo {
		dev.boundTo[gw] = true
	}
	reg.devices[d.ID] = dev
	s.notifyLocked()
	s.mu.Unlock()
	return s.save()
}

// bindableLocked checks that gatewayID is a gateway of reg that dev may be bound to.
func (s *Server) bindableLocked(reg *registry, gatewayID string, dev Device) error {
	gw, ok := reg.devices[gatewayID]
	switch {
	case !ok:
		return fmt.Errorf("gateway %q in registry %q: %w", gatewayID, reg.id, ErrNotFound)
	case !gw.Gateway:
		return fmt.Errorf("%q is not a gateway", gatewayID)
	case dev.Gateway:
		return fmt.Errorf("%q is a gateway; gateways cannot be bound to gateways", dev.ID)
	}
	return nil
}

// Fields UpdateDevice can change: KORE's updateMask values.
const (
	FieldBlocked     = "blocked"
	FieldCredentials = "credentials"
	FieldMetadata    = "metadata"
	FieldLogLevel    = "logLevel"
	FieldPolicy      = "policy"
	FieldAuthMethod  = "gatewayConfig.gatewayAuthMethod"
)

// UpdateDevice changes the fields of mask to spec's values. New or rotated
// keys are accepted from the next connect or attach on (connections up stay
// up); blocking closes the device's connection and detaches it everywhere.
func (s *Server) UpdateDevice(registryID, deviceID string, mask []string, spec DeviceSpec) error {
	if len(mask) == 0 {
		return errors.New("updateMask is required: " + FieldBlocked + ", " + FieldCredentials + ", " + FieldMetadata + ", " + FieldLogLevel + ", " + FieldPolicy + " or " + FieldAuthMethod)
	}
	set := map[string]bool{}
	for _, f := range mask {
		switch f {
		case FieldBlocked, FieldCredentials, FieldMetadata, FieldLogLevel, FieldPolicy, FieldAuthMethod:
			set[f] = true
		default:
			return fmt.Errorf("updateMask: %s is not a field that can be updated", trunc(f))
		}
	}
	if spec.ID != "" && spec.ID != deviceID {
		return fmt.Errorf("the body's id %q is not the device %q of the path", spec.ID, deviceID)
	}
	newKeys, newPubs, err := parseKeys(deviceID, spec.PublicKeys)
	if set[FieldCredentials] && err != nil {
		return err
	}
	if err := spec.Meta.validate(); err != nil && (set[FieldMetadata] || set[FieldLogLevel]) {
		return err
	}
	s.mu.Lock()
	dev, err := s.deviceLocked(registryID, deviceID)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if set[FieldAuthMethod] {
		d := Device{ID: deviceID, Gateway: dev.Gateway, AuthMethod: spec.AuthMethod}
		if !dev.Gateway || spec.AuthMethod == "" {
			s.mu.Unlock()
			return fmt.Errorf("%s: %q is not a gateway, or no auth method given", FieldAuthMethod, deviceID)
		}
		if err := normalizeGateway(&d); err != nil {
			s.mu.Unlock()
			return err
		}
		dev.AuthMethod = d.AuthMethod
	}
	if set[FieldCredentials] {
		dev.PublicKeys, dev.keys = newPubs, newKeys
	}
	if set[FieldMetadata] {
		dev.meta.Metadata = maps.Clone(spec.Meta.Metadata)
	}
	if set[FieldLogLevel] {
		dev.meta.LogLevel = spec.Meta.LogLevel
	}
	if set[FieldPolicy] {
		dev.meta.Policy = slices.Clone(spec.Meta.Policy)
	}
	dev.updated = time.Now()
	s.notifyLocked()
	s.mu.Unlock()
	if set[FieldBlocked] {
		return s.setBlocked(registryID, deviceID, spec.Blocked, true)
	}
	return s.save()
}

// setBlocked blocks or unblocks a device. With closeLive, blocking also
// closes the device's own connection and detaches it from every gateway
// connection (GATEWAY_DETACHMENT_DEVICE_ERROR), as the REST API does.
func (s *Server) setBlocked(registryID, deviceID string, blocked, closeLive bool) error {
	s.mu.Lock()
	dev, err := s.deviceLocked(registryID, deviceID)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	changed := dev.Blocked != blocked
	dev.Blocked = blocked
	if changed {
		dev.updated = time.Now()
	}
	s.notifyLocked()
	s.mu.Unlock()
	if blocked && closeLive {
		s.disconnectDevice(registryID, deviceID, ReasonBlocked)
	}
	return s.save()
}

// BlockDevice is the REST API's block: SetBlocked plus, when blocking, the
// device's connection closed and its attachments dropped at once.
func (s *Server) BlockDevice(registryID, deviceID string, blocked bool) error {
	return s.setBlocked(registryID, deviceID, blocked, true)
}

// DeleteDevice removes a device: its connection is closed, it is detached
// from every gateway, and a deleted gateway's bindings go with it.
func (s *Server) DeleteDevice(registryID, deviceID string) error {
	s.mu.Lock()
	reg, ok := s.registries[registryID]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("registry %q: %w", registryID, ErrNotFound)
	}
	dev, ok := reg.devices[deviceID]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("device %q in registry %q: %w", deviceID, registryID, ErrNotFound)
	}
	delete(reg.devices, deviceID)
	if dev.Gateway {
		for _, d := range reg.devices {
			delete(d.boundTo, deviceID)
		}
	}
	s.notifyLocked()
	s.mu.Unlock()
	s.disconnectDevice(registryID, deviceID, ReasonDeleted)
	return s.save()
}

// SetBindings binds (or unbinds) devices to a gateway, all or none. Unbinding
// a device that is not bound is not an error. A device already attached
// stays attached; its next attach is refused.
func (s *Server) SetBindings(registryID, gatewayID string, deviceIDs []string, bound bool) error {
	s.mu.Lock()
	reg, ok := s.registries[registryID]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("registry %q: %w", registryID, ErrNotFound)
	}
	devs := make([]*device, 0, len(deviceIDs))
	for _, id := range deviceIDs {
		dev, ok := reg.devices[id]
		if !ok {
			s.mu.Unlock()
			return fmt.Errorf("device %q in registry %q: %w", id, registryID, ErrNotFound)
		}
		if err := s.bindableLocked(reg, gatewayID, dev.Device); err != nil {
			s.mu.Unlock()
			return err
		}
		devs = append(devs, dev)
	}
	for _, dev := range devs {
		if bound {
			dev.boundTo[gatewayID] = true
		} else {
			delete(dev.boundTo, gatewayID)
		}
	}
	s.notifyLocked()
	s.mu.Unlock()
	return s.save()
}

// disconnectDevice closes the device's own live connection and detaches it
// from every gateway connection, raising GATEWAY_DETACHMENT_DEVICE_ERROR there.
func (s *Server) disconnectDevice(registryID, deviceID, reason string) {
	type detached struct {
		c       *conn
		filters []string
	}
	s.mu.Lock()
	own := s.byClientID[s.ClientID(registryID, deviceID)]
	var gone []detached
	for _, c := range s.conns {
		if c.registry != registryID || c == own {
			continue
		}
		if _, ok := c.attached[deviceID]; ok {
			gone = append(gone, detached{c, c.dropDeviceLocked(deviceID)})
			s.stats.BridgeDetaches++
		}
	}
	s.notifyLocked()
	s.mu.Unlock()
	for _, d := range gone {
		d.c.unsubscribeBroker(d.filters)
		d.c.raise(omnicore.ErrorMessage{
			ErrorType:   omnicore.ErrorDetachedByError,
			Description: fmt.Sprintf("Device '%s' detached: %s.", deviceID, reason),
			DeviceID:    deviceID,
		})
	}
	if own != nil {
		own.close(reason, "")
		s.waitGone(func() bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			_, ok := s.conns[own.cl]
			return !ok
		})
	}
}

// lookupLocked finds a device, nil if it or its registry is gone (a live
// connection may outlive either for a moment).
func (s *Server) lookupLocked(registryID, deviceID string) *device {
	if reg := s.registries[registryID]; reg != nil {
		return reg.devices[deviceID]
	}
	return nil
}

// usableKeys are the device's keys that have not expired.
func (d *device) usableKeys(now time.Time) []crypto.PublicKey {
	out := make([]crypto.PublicKey, 0, len(d.keys))
	for i, k := range d.keys {
		if exp := d.PublicKeys[i].Expires; exp.IsZero() || now.Before(exp) {
			out = append(out, k)
		}
	}
	return out
}

// recordData notes an accepted events or state message of the device.
func (d *device) recordData(kind omnicore.Kind, payload []byte, now time.Time) {
	if kind != omnicore.KindState {
		d.lastEvent = now
		return
	}
	d.lastState = now
	if len(d.states) >= maxStatesKept {
		d.states = slices.Delete(d.states, 0, len(d.states)-maxStatesKept+1)
	}
	d.states = append(d.states, DeviceState{Payload: payload, Time: now})
}

// States returns a device's latest state messages, newest first: n at most
// (0: all kept, which is 10 at most).
func (s *Server) States(registryID, deviceID string, n int) ([]DeviceState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	dev, err := s.deviceLocked(registryID, deviceID)
	if err != nil {
		return nil, err
	}
	return newestFirst(dev.states, n), nil
}

// ConfigVersions returns a device's latest config versions, newest first: n
// at most (0: all kept, which is 10 at most).
func (s *Server) ConfigVersions(registryID, deviceID string, n int) ([]ConfigVersion, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	dev, err := s.deviceLocked(registryID, deviceID)
	if err != nil {
		return nil, err
	}
	return newestFirst(dev.config.history, n), nil
}

func newestFirst[T any](in []T, n int) []T {
	out := slices.Clone(in)
	slices.Reverse(out)
	if n > 0 && n < len(out) {
		out = out[:n]
	}
	return out
}
