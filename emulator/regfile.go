package emulator

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// RegistryFile is the JSON registry the command loads (README.md documents it).
type RegistryFile struct {
	Subscription string          `json:"subscription"`
	Registries   []RegistryEntry `json:"registries"`
}

// RegistryEntry is one registry and its devices.
type RegistryEntry struct {
	ID      string        `json:"id"`
	Devices []DeviceEntry `json:"devices"`
}

// DeviceEntry is a device or gateway of a registry file.
type DeviceEntry struct {
	ID         string     `json:"id"`
	Gateway    bool       `json:"gateway,omitempty"`
	AuthMethod AuthMethod `json:"auth_method,omitempty"`
	Blocked    bool       `json:"blocked,omitempty"`
	BoundTo    []string   `json:"bound_to,omitempty"`
	PublicKeys []KeyEntry `json:"public_keys,omitempty"`
	Config     *string    `json:"config,omitempty"`
}

// KeyEntry is a device credential: exactly one of PEM (inline), PEMFile
// (relative to the registry file) or Generate (a key pair made on first start
// in the key directory and reused afterwards).
type KeyEntry struct {
	Algorithm string `json:"algorithm"`
	PEM       string `json:"pem,omitempty"`
	PEMFile   string `json:"pem_file,omitempty"`
	Generate  bool   `json:"generate,omitempty"`
}

// GeneratedKey is a key pair ApplyRegistryFile made or reused for a device.
type GeneratedKey struct {
	Registry    string
	Device      string
	Algorithm   string
	PrivatePath string
	PublicPath  string
}

// ReadRegistryFile parses a registry file strictly (unknown fields are errors).
func ReadRegistryFile(path string) (*RegistryFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f RegistryFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if f.Subscription == "" {
		return nil, fmt.Errorf("%s: \"subscription\" is required", path)
	}
	if err := omnicore.ValidateID(f.Subscription); err != nil {
		return nil, fmt.Errorf("%s: subscription: %w", path, err)
	}
	return &f, nil
}

// ApplyRegistryFile adds the file's registries, devices, bindings and initial
// configs. Relative pem_file paths are read from baseDir; generated keys live
// in keyDir/{registry}/{device}.key|.pub. The file's subscription must be the
// server's.
func (s *Server) ApplyRegistryFile(f *RegistryFile, baseDir, keyDir string) ([]GeneratedKey, error) {
	if f.Subscription != s.subscription {
		return nil, fmt.Errorf("registry file is for subscription %q, the server runs %q", f.Subscription, s.subscription)
	}
	var generated []GeneratedKey
	for _, reg := range f.Registries {
		if err := s.AddRegistry(reg.ID); err != nil {
			return nil, err
		}
		// Gateways first, so bound_to can refer to any gateway of the registry.
		for pass := 0; pass < 2; pass++ {
			for _, de := range reg.Devices {
				if de.Gateway != (pass == 0) {
					continue
				}
				d := Device{ID: de.ID, Gateway: de.Gateway, AuthMethod: de.AuthMethod, Blocked: de.Blocked}
				for i, k := range de.PublicKeys {
					pub, gen, err := loadKeyEntry(k, baseDir, filepath.Join(keyDir, reg.ID), de.ID)
					if err != nil {
						return nil, fmt.Errorf("registry %q device %q key %d: %w", reg.ID, de.ID, i+1, err)
					}
					if gen != nil {
						gen.Registry = reg.ID
						generated = append(generated, *gen)
					}
					d.PublicKeys = append(d.PublicKeys, pub)
				}
				if err := s.AddDevice(reg.ID, d); err != nil {
					return nil, err
				}
			}
		}
		for _, de := range reg.Devices {
			for _, gw := range de.BoundTo {
				if err := s.Bind(reg.ID, gw, de.ID); err != nil {
					return nil, fmt.Errorf("registry %q: binding %q to %q: %w", reg.ID, de.ID, gw, err)
				}
			}
			if de.Config != nil {
				if _, err := s.SetConfig(reg.ID, de.ID, []byte(*de.Config)); err != nil {
					return nil, err
				}
			}
		}
	}
	return generated, nil
}

func loadKeyEntry(k KeyEntry, baseDir, keyDir, deviceID string) (PublicKey, *GeneratedKey, error) {
	set := 0
	for _, b := range []bool{k.PEM != "", k.PEMFile != "", k.Generate} {
		if b {
			set++
		}
	}
	if set != 1 {
		return PublicKey{}, nil, errors.New(`exactly one of "pem", "pem_file" and "generate" must be set`)
	}
	switch {
	case k.PEM != "":
		return PublicKey{Algorithm: k.Algorithm, PEM: []byte(k.PEM)}, nil, nil
	case k.PEMFile != "":
		path := k.PEMFile
		if !filepath.IsAbs(path) {
			path = filepath.Join(baseDir, path)
		}
		pem, err := os.ReadFile(path)
		if err != nil {
			return PublicKey{}, nil, err
		}
		return PublicKey{Algorithm: k.Algorithm, PEM: pem}, nil, nil
	}
	if k.Algorithm != omnicore.RS256 && k.Algorithm != omnicore.ES256 {
		return PublicKey{}, nil, fmt.Errorf("algorithm %q is not RS256 or ES256", k.Algorithm)
	}
	name := deviceID + "-" + k.Algorithm
	gen := &GeneratedKey{
		Device: deviceID, Algorithm: k.Algorithm,
		PrivatePath: filepath.Join(keyDir, name+".key"), PublicPath: filepath.Join(keyDir, name+".pub"),
	}
	pem, err := os.ReadFile(gen.PublicPath)
	if err == nil {
		if _, err := os.Stat(gen.PrivatePath); err == nil {
			return PublicKey{Algorithm: k.Algorithm, PEM: pem}, gen, nil
		}
	}
	if err := os.MkdirAll(keyDir, 0o700); err != nil {
		return PublicKey{}, nil, err
	}
	if _, _, err := omnicore.WriteKeyPair(keyDir, name, k.Algorithm); err != nil {
		return PublicKey{}, nil, err
	}
	if pem, err = os.ReadFile(gen.PublicPath); err != nil {
		return PublicKey{}, nil, err
	}
	return PublicKey{Algorithm: k.Algorithm, PEM: pem}, gen, nil
}
