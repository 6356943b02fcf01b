package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"sigs.k8s.io/yaml"
)

// fileConfig is ~/.config/gpusched/config.yaml ($XDG_CONFIG_HOME honoured).
// Precedence for every setting: flag, then environment, then this file.
type fileConfig struct {
	// Server is the scheduler endpoint list, as for --server.
	Server string `json:"server"`
	// Token authenticates the client (when authentication lands).
	Token string `json:"token"`
}

// configPath returns where the config file lives.
func configPath() string {
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "gpusched", "config.yaml")
}

// loadFileConfig reads the config file; a missing file is an empty config.
func loadFileConfig() (fileConfig, error) {
	var c fileConfig
	p := configPath()
	if p == "" {
		return c, nil
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("config %s: %w", p, err)
	}
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return c, usageError("config %s: %v", p, err)
	}
	return c, nil
}

// resolve picks the first non-empty of flag, environment and file.
func resolve(flag, env, file string) string {
	switch {
	case flag != "":
		return flag
	case env != "":
		return env
	}
	return file
}
