"""Egress policy: host rules and address rules, decided before any byte goes upstream and again at connect time."""
