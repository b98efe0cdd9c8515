package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// provisioning decides where the registry comes from. The state directory's
// saved provisioning wins: a registry file only seeds an empty one (seed is
// nil otherwise), so that what the REST API changed survives a restart. The
// subscription is -subscription, else the saved one, else the file's; two
// that differ are an error.
func provisioning(registryPath, subscription, stateDir string) (seed *emulator.RegistryFile, sub string, err error) {
	saved, hasSaved, err := emulator.SavedSubscription(stateDir)
	if err != nil {
		return nil, "", err
	}
	if registryPath != "" {
		rf, err := emulator.ReadRegistryFile(registryPath)
		if err != nil {
			return nil, "", err
		}
		if !hasSaved {
			seed = rf
		}
		if subscription == "" && !hasSaved {
			subscription = rf.Subscription
		}
	}
	switch {
	case hasSaved && subscription != "" && subscription != saved:
		return nil, "", fmt.Errorf("-subscription %q: %s in %s is for %q (delete it to start afresh)", subscription, emulator.ProvisioningFile, stateDir, saved)
	case hasSaved:
		return seed, saved, nil
	case subscription == "":
		return nil, "", errors.New("give -subscription or -registry: the state directory holds no provisioning yet")
	}
	if err := omnicore.ValidateID(subscription); err != nil {
		return nil, "", fmt.Errorf("-subscription: %w", err)
	}
	return seed, subscription, nil
}

// keptKeys lists the key pairs a registry file had generated on an earlier
// start (keys/{registry}/{device}-{ALG}.key), for the banner.
func keptKeys(dir string) ([]emulator.GeneratedKey, error) {
	var out []emulator.GeneratedKey
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return fs.SkipAll
		}
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".key") {
			return err
		}
		name := strings.TrimSuffix(filepath.Base(path), ".key")
		i := strings.LastIndex(name, "-")
		if i < 0 {
			return nil
		}
		out = append(out, emulator.GeneratedKey{
			Registry: filepath.Base(filepath.Dir(path)), Device: name[:i], Algorithm: name[i+1:],
			PrivatePath: path, PublicPath: strings.TrimSuffix(path, ".key") + ".pub",
		})
		return nil
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PrivatePath < out[j].PrivatePath })
	return out, nil
}
