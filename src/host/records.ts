/**
 * What the coordination store holds about groups and VMs (control plane only;
 * never touched on the per-epoch path). A VM record is changed only by
 * compare-and-swap, and every change of primary bumps the incarnation: that
 * CAS is the failover decision, so two hosts can never both promote.
 */
import type { Manifest } from "../cluster/manifest.js";

export type ReplicaHealth = "healthy" | "degraded" | "lost";

export interface VmRecord {
  vm: string;
  group: string;
  rank: number;
  mode: Manifest["mode"];
  primary: string;
  backup: string | null;
  incarnation: number;
  health: ReplicaHealth;
  /** Adaptive epochs: output waiting → checkpoint min_interval_ms after the last one; idle → interval_ms, doubling up to max_interval_ms. */
  interval_ms: number;
  min_interval_ms: number;
  max_interval_ms: number;
  limits: Manifest["limits"];
  size: number;
}

export interface GroupRecord {
  group: string;
  mode: Manifest["mode"];
  size: number;
  vms: string[];
  module: string;
  deployed_at_ms: number;
}

export const vmKey = (vm: string) => `vms/${vm}`;
export const groupKey = (group: string) => `groups/${group}`;
export const hostKey = (host: string) => `hosts/${host}`;
export const vmName = (group: string, rank: number) => `${group}-${rank}`;
