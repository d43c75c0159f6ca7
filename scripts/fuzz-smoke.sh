#!/usr/bin/env bash
echo "fuzz: not set up yet"
