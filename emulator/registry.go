package emulator

import (
	"crypto"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"
)

// AuthMethod is a gateway's gatewayAuthMethod: how it proves it may speak for
// a device it attaches.
type AuthMethod string

const (
	// AssociationOnly: the device must be bound to the gateway; no device JWT.
	AssociationOnly AuthMethod = "ASSOCIATION_ONLY"
	// DeviceAuthTokenOnly: the attach carries a JWT signed with the device's key.
	DeviceAuthTokenOnly AuthMethod = "DEVICE_AUTH_TOKEN_ONLY"
	// AssociationAndDeviceAuthToken: both.
	AssociationAndDeviceAuthToken AuthMethod = "ASSOCIATION_AND_DEVICE_AUTH_TOKEN"
)

func (m AuthMethod) needsBinding() bool {
	return m == AssociationOnly || m == AssociationAndDeviceAuthToken
}

func (m AuthMethod) needsToken() bool {
	return m == DeviceAuthTokenOnly || m == AssociationAndDeviceAuthToken
}

// maxCredentials is the bridge's limit of public keys per device.
const maxCredentials = 3

// Errors returned by the registry and cloud-side calls.
var (
	ErrNotFound      = errors.New("not found")
	ErrExists        = errors.New("already exists")
	ErrNotSubscribed = errors.New("device is not subscribed to commands on any live connection")
)

// PublicKey is a device credential: a PEM public key (PKIX or PKCS#1) or an
// X.509 certificate, for RS256 or ES256.
type PublicKey struct {
	Algorithm string
	PEM       []byte
	// Format is KORE's name for the key's kind (RSA_PEM, ES256_PEM,
	// RSA_X509_PEM, ES256_X509_PEM); when empty it is derived from Algorithm
	// and the PEM block, and Algorithm from it when that is empty.
	Format string
	// Expires is when the key stops being accepted for new connections and
	// attaches (zero: never), like KORE's credential expirationTime.
	Expires time.Time
}

// Device is a registry entry. A gateway's AuthMethod defaults to
// AssociationOnly; non-gateways have none.
type Device struct {
	ID         string
	Gateway    bool
	AuthMethod AuthMethod
	PublicKeys []PublicKey
	Blocked    bool
}

// device is the emulator's state for one registry entry. Guarded by Server.mu.
type device struct {
	Device
	// keys are PublicKeys parsed, index for index. A credential update
	// replaces both slices (never changes them in place), so a slice read
	// under the lock stays valid after it.
	keys      []crypto.PublicKey
	numID     int64
	meta      DeviceMeta
	created   time.Time
	updated   time.Time
	boundTo   map[string]bool // gateway IDs
	config    configState
	lastState time.Time // last accepted state message, for StateInterval
	lastEvent time.Time
	states    []DeviceState // the latest maxStatesKept, oldest first
}

type configState struct {
	payload      []byte
	version      int // 0 = never set
	updated      time.Time
	ackedVersion int
	acked        time.Time
	history      []ConfigVersion // the latest maxConfigVersionsKept, oldest first
}

type registry struct {
	id       string
	created  time.Time
	updated  time.Time
	settings RegistrySettings
	devices  map[string]*device
}

// AddRegistry creates an empty registry.
func (s *Server) AddRegistry(id string) error {
	return s.CreateRegistry(id, RegistrySettings{})
}

// AddDevice adds a device (or gateway) to a registry. Its keys are parsed now,
// so a bad PEM fails here rather than at CONNECT.
func (s *Server) AddDevice(registryID string, d Device) error {
	return s.CreateDevice(registryID, DeviceSpec{Device: d})
}

// Bind associates a device with a gateway (needed for the association auth methods).
func (s *Server) Bind(registryID, gatewayID, deviceID string) error {
	return s.setBinding(registryID, gatewayID, deviceID, true)
}

// Unbind removes a binding. A device already attached stays attached until it
// is detached or the connection ends.
func (s *Server) Unbind(registryID, gatewayID, deviceID string) error {
	return s.setBinding(registryID, gatewayID, deviceID, false)
}

func (s *Server) setBinding(registryID, gatewayID, deviceID string, bound bool) error {
	return s.SetBindings(registryID, gatewayID, []string{deviceID}, bound)
}

// SetBlocked blocks or unblocks a device. A blocked device cannot connect or be
// attached; connections and attachments made before stay up (use KickAll to
// force a reconnect).
func (s *Server) SetBlocked(registryID, deviceID string, blocked bool) error {
	return s.setBlocked(registryID, deviceID, blocked, false)
}

func (s *Server) deviceLocked(registryID, deviceID string) (*device, error) {
	reg, ok := s.registries[registryID]
	if !ok {
		return nil, fmt.Errorf("registry %q: %w", registryID, ErrNotFound)
	}
	dev, ok := reg.devices[deviceID]
	if !ok {
		return nil, fmt.Errorf("device %q in registry %q: %w", deviceID, registryID, ErrNotFound)
	}
	return dev, nil
}

// DeviceStatus is a device as the admin API lists it.
type DeviceStatus struct {
	Registry           string     `json:"registry"`
	ID                 string     `json:"id"`
	Gateway            bool       `json:"gateway"`
	AuthMethod         AuthMethod `json:"auth_method,omitempty"`
	Blocked            bool       `json:"blocked"`
	Keys               int        `json:"keys"`
	BoundTo            []string   `json:"bound_to,omitempty"`
	Connected          bool       `json:"connected"`
	AttachedTo         []string   `json:"attached_to,omitempty"`
	ConfigVersion      int        `json:"config_version"`
	ConfigUpdated      time.Time  `json:"config_updated,omitzero"`
	ConfigAckedVersion int        `json:"config_acked_version"`
	ConfigAcked        time.Time  `json:"config_acked,omitzero"`
	LastState          time.Time  `json:"last_state,omitzero"`
}

// Devices lists every device of every registry, sorted by registry and ID.
func (s *Server) Devices() []DeviceStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	connected := map[string]bool{}
	attachedTo := map[string][]string{}
	for _, c := range s.conns {
		connected[c.registry+"/"+c.device] = true
		for dev := range c.attached {
			k := c.registry + "/" + dev
			attachedTo[k] = append(attachedTo[k], c.device)
		}
	}
	var out []DeviceStatus
	for _, reg := range s.registries {
		for _, d := range reg.devices {
			k := reg.id + "/" + d.ID
			st := DeviceStatus{
				Registry: reg.id, ID: d.ID, Gateway: d.Gateway, AuthMethod: d.AuthMethod,
				Blocked: d.Blocked, Keys: len(d.keys), Connected: connected[k],
				AttachedTo:    sortedCopy(attachedTo[k]),
				ConfigVersion: d.config.version, ConfigUpdated: d.config.updated,
				ConfigAckedVersion: d.config.ackedVersion, ConfigAcked: d.config.acked,
				LastState: d.lastState,
			}
			for gw := range d.boundTo {
				st.BoundTo = append(st.BoundTo, gw)
			}
			sort.Strings(st.BoundTo)
			out = append(out, st)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Registry != out[j].Registry {
			return out[i].Registry < out[j].Registry
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Config returns a device's latest config and its version (0: never set).
func (s *Server) Config(registryID, deviceID string) (payload []byte, version int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	dev, err := s.deviceLocked(registryID, deviceID)
	if err != nil {
		return nil, 0, err
	}
	return slices.Clone(dev.config.payload), dev.config.version, nil
}

func sortedCopy(in []string) []string {
	if len(in) == 0 {
		return nil
	}
	out := slices.Clone(in)
	sort.Strings(out)
	return out
}
