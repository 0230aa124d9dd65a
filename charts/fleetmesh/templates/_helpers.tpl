{{/*
Name prefix of every object: <release>-fleetmesh, or the release name if it contains the chart name. At most 40
characters, so that "<fullname>-clustermesh-apiserver" is still a valid DNS label (63).
*/}}
{{- define "fleetmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fleetmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetmesh.agent.name" -}}
{{- printf "%s-agent" (include "fleetmesh.fullname" .) -}}
{{- end -}}

{{- define "fleetmesh.apiserver.name" -}}
{{- printf "%s-clustermesh-apiserver" (include "fleetmesh.fullname" .) -}}
{{- end -}}

{{- define "fleetmesh.config.name" -}}
{{- printf "%s-config" (include "fleetmesh.fullname" .) -}}
{{- end -}}

{{- define "fleetmesh.clustermeshSecret.name" -}}
{{- default (printf "%s-clustermesh" (include "fleetmesh.fullname" .)) .Values.clustermesh.config.secretName -}}
{{- end -}}

{{/*
Peers' TLS material written by `meshctl clustermesh connect` (keys <peer>.ca.crt, <peer>.tls.crt, <peer>.tls.key,
<peer>.cluster.yaml); mounted (optional) into the agents. Not rendered by the chart.
*/}}
{{- /* The Secret with this cluster's CA and the read-only client certificate it hands to peers (created by the user). */ -}}
{{- define "fleetmesh.remoteClient.name" -}}
{{- printf "%s-clustermesh-remote-client" (include "fleetmesh.fullname" .) -}}
{{- end -}}

{{- /* "secret", "service" or "" : where the agents' own-etcd config (--kvstore-config) comes from. */ -}}
{{- define "fleetmesh.ownKvstore.mode" -}}
{{- if .Values.clustermesh.ownKvstoreSecret -}}secret
{{- else if .Values.clustermesh.ownKvstoreService -}}service
{{- end -}}
{{- end -}}

{{- define "fleetmesh.clustermeshRemoteCerts.name" -}}
{{- printf "%s-clustermesh-remote-certs" (include "fleetmesh.fullname" .) -}}
{{- end -}}

{{- define "fleetmesh.tls.serverSecret" -}}
{{- default (printf "%s-clustermesh-server-cert" (include "fleetmesh.fullname" .)) .Values.clustermesh.tls.existingSecret -}}
{{- end -}}

{{/* The chart's Secret with the peers' CAs and client certificates given as PEM (keys <peer>.ca.crt, ...). */}}
{{- define "fleetmesh.tls.peersSecret" -}}
{{- printf "%s-clustermesh-peer-certs" (include "fleetmesh.fullname" .) -}}
{{- end -}}

{{/* Where the agent finds a peer's TLS files: /var/lib/fleetmesh/clustermesh-tls/<peer>/{ca.crt,tls.crt,tls.key}. */}}
{{- define "fleetmesh.tls.peersDir" -}}
/var/lib/fleetmesh/clustermesh-tls
{{- end -}}

{{/* Where the agents (--clustermesh-config) and the clustermesh-apiserver (--mcs-peers) find the peers' files. */}}
{{- define "fleetmesh.clustermeshConfig.dir" -}}
/var/lib/fleetmesh/clustermesh
{{- end -}}

{{/*
The peers' config and every certificate its files name, as volumes: the clustermesh config Secret (one file per
peer), the Secret meshctl writes the peers' certificates into, and the peers' TLS material of `clustermesh.peers`.
The agents and the clustermesh-apiserver mount them at the same paths (fleetmesh.clustermeshConfig.volumeMounts), so
that the certificate paths of the peer files resolve in both. Pass a dict with "ctx" (the root context) and "mode"
(defaultMode of the files).
*/}}
{{- define "fleetmesh.clustermeshConfig.volumes" -}}
- name: clustermesh-config
  secret:
    secretName: {{ include "fleetmesh.clustermeshSecret.name" .ctx }}
    defaultMode: {{ .mode }}
    optional: true
# Managed by `meshctl clustermesh connect|disconnect`, never rendered by the chart.
- name: clustermesh-remote-certs
  secret:
    secretName: {{ include "fleetmesh.clustermeshRemoteCerts.name" .ctx }}
    defaultMode: {{ .mode }}
    optional: true
{{- if include "fleetmesh.tls.anyPeer" .ctx }}
# Each peer's CA and client certificate at <peer>/ca.crt, <peer>/tls.crt, <peer>/tls.key.
- name: clustermesh-tls
  projected:
    defaultMode: {{ .mode }}
    sources:
      {{- range .ctx.Values.clustermesh.peers }}
      {{- if .tls }}
      - secret:
          {{- if .tls.existingSecret }}
          name: {{ .tls.existingSecret }}
          items:
            - key: ca.crt
              path: {{ .name }}/ca.crt
            - key: tls.crt
              path: {{ .name }}/tls.crt
            - key: tls.key
              path: {{ .name }}/tls.key
          {{- else }}
          name: {{ include "fleetmesh.tls.peersSecret" $.ctx }}
          items:
            - key: {{ .name }}.ca.crt
              path: {{ .name }}/ca.crt
            - key: {{ .name }}.tls.crt
              path: {{ .name }}/tls.crt
            - key: {{ .name }}.tls.key
              path: {{ .name }}/tls.key
          {{- end }}
      {{- end }}
      {{- end }}
{{- end }}
{{- end -}}

{{/* The mounts of fleetmesh.clustermeshConfig.volumes; pass the root context. */}}
{{- define "fleetmesh.clustermeshConfig.volumeMounts" -}}
- name: clustermesh-config
  mountPath: {{ include "fleetmesh.clustermeshConfig.dir" . }}
  readOnly: true
# Peers' CAs and client certificates written by `meshctl clustermesh connect` (<peer>.ca.crt, ...).
- name: clustermesh-remote-certs
  mountPath: /var/lib/fleetmesh/clustermesh-remote-certs
  readOnly: true
{{- if include "fleetmesh.tls.anyPeer" . }}
- name: clustermesh-tls
  mountPath: {{ include "fleetmesh.tls.peersDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* "true" when some peer has TLS material (then the agent mounts the peers' certificates). */}}
{{- define "fleetmesh.tls.anyPeer" -}}
{{- range .Values.clustermesh.peers -}}{{- if .tls -}}true{{- end -}}{{- end -}}
{{- end -}}

{{/* "true" when some peer's TLS material is given as PEM (then the chart renders the peers' Secret). */}}
{{- define "fleetmesh.tls.anyPeerPem" -}}
{{- range .Values.clustermesh.peers -}}{{- if and .tls (not .tls.existingSecret) -}}true{{- end -}}{{- end -}}
{{- end -}}

{{- define "fleetmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/* Labels of every object; pass a dict with "ctx" (the root context) and "component". */}}
{{- define "fleetmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fleetmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: fleetmesh
{{- end -}}

{{- define "fleetmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Fails unless .name is a valid cluster name; .what names the value in the message. */}}
{{- define "fleetmesh.validateClusterName" -}}
{{- $name := toString .name -}}
{{- if not (regexMatch "^([a-z0-9][-a-z0-9]*)?[a-z0-9]$" $name) -}}
{{- fail (printf "%s %q is not a valid cluster name: use lower-case letters, digits and '-', starting and ending with a letter or digit (^([a-z0-9][-a-z0-9]*)?[a-z0-9]$)" .what $name) -}}
{{- end -}}
{{- if gt (len $name) 32 -}}
{{- fail (printf "%s %q is not a valid cluster name: %d characters, at most 32 are allowed" .what $name (len $name)) -}}
{{- end -}}
{{- end -}}

{{/* Checks every value the templates depend on; renders nothing. */}}
{{- define "fleetmesh.validate" -}}
{{- include "fleetmesh.validateClusterName" (dict "name" .Values.cluster.name "what" "cluster.name") -}}
{{- $id := toString .Values.cluster.id -}}
{{- if not (regexMatch "^[0-9]+$" $id) -}}
{{- fail (printf "cluster.id %q is not valid: it must be an integer from 1 to 4095" $id) -}}
{{- end -}}
{{- if or (lt (atoi $id) 1) (gt (atoi $id) 4095) -}}
{{- fail (printf "cluster.id %s is out of range: it must be an integer from 1 to 4095" $id) -}}
{{- end -}}
{{- if not (has (toString .Values.serviceAffinityDefault) (list "none" "local" "remote")) -}}
{{- fail (printf "serviceAffinityDefault %q is not valid: use none, local or remote" (toString .Values.serviceAffinityDefault)) -}}
{{- end -}}
{{- if not (has (toString .Values.clustermesh.apiserver.service.type) (list "NodePort" "LoadBalancer")) -}}
{{- fail (printf "clustermesh.apiserver.service.type %q is not valid: use NodePort or LoadBalancer" (toString .Values.clustermesh.apiserver.service.type)) -}}
{{- end -}}
{{- if not (has (toString .Values.clustermesh.apiserver.service.externalTrafficPolicy) (list "Cluster" "Local")) -}}
{{- fail (printf "clustermesh.apiserver.service.externalTrafficPolicy %q is not valid: use Cluster or Local" (toString .Values.clustermesh.apiserver.service.externalTrafficPolicy)) -}}
{{- end -}}
{{- if not (has (toString .Values.source) (list "manifests" "kubernetes")) -}}
{{- fail (printf "source %q is not valid: use manifests or kubernetes" (toString .Values.source)) -}}
{{- end -}}
{{- if not .Values.logLevel -}}
{{- fail "logLevel must not be empty (e.g. info)" -}}
{{- end -}}
{{- $port := toString .Values.metrics.port -}}
{{- if or (not (regexMatch "^[0-9]+$" $port)) (lt (atoi $port) 1) (gt (atoi $port) 65535) -}}
{{- fail (printf "metrics.port %q is not a port number (1-65535)" $port) -}}
{{- end -}}
{{- $status := toString .Values.agent.statusPort -}}
{{- if or (not (regexMatch "^[0-9]+$" $status)) (gt (atoi $status) 65535) -}}
{{- fail (printf "agent.statusPort %q is not a port number (1-65535, or 0 for none)" $status) -}}
{{- end -}}
{{- if and .Values.metrics.enabled (eq $status $port) -}}
{{- fail (printf "agent.statusPort and metrics.port are both %s: the agent cannot serve both there" $port) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $p := .Values.clustermesh.peers -}}
{{- if not (kindIs "map" $p) -}}
{{- fail (printf "clustermesh.peers[%d] must be a map with name and endpoints" $i) -}}
{{- end -}}
{{- include "fleetmesh.validateClusterName" (dict "name" (default "" $p.name) "what" (printf "clustermesh.peers[%d].name" $i)) -}}
{{- if eq (toString $p.name) (toString $.Values.cluster.name) -}}
{{- fail (printf "clustermesh.peers[%d].name %q is this cluster's own name (cluster.name)" $i (toString $p.name)) -}}
{{- end -}}
{{- if hasKey $seen (toString $p.name) -}}
{{- fail (printf "clustermesh.peers[%d].name %q appears more than once" $i (toString $p.name)) -}}
{{- end -}}
{{- $_ := set $seen (toString $p.name) true -}}
{{- if or (not (kindIs "slice" $p.endpoints)) (empty $p.endpoints) -}}
{{- fail (printf "clustermesh.peers[%d] (%s) needs a non-empty endpoints list of URLs (http:// or https://)" $i (toString $p.name)) -}}
{{- end -}}
{{- $https := 0 -}}
{{- range $p.endpoints -}}
{{- if not (regexMatch "^https?://[^/]+" (toString .)) -}}
{{- fail (printf "clustermesh.peers[%d] (%s): endpoint %q is not an http:// or https:// URL" $i (toString $p.name) (toString .)) -}}
{{- end -}}
{{- if hasPrefix "https://" (toString .) -}}{{- $https = add1 $https -}}{{- end -}}
{{- end -}}
{{- if and (gt $https 0) (lt $https (len $p.endpoints)) -}}
{{- fail (printf "clustermesh.peers[%d] (%s): endpoints mix http:// and https:// URLs" $i (toString $p.name)) -}}
{{- end -}}
{{- if and (gt $https 0) (not $p.tls) -}}
{{- fail (printf "clustermesh.peers[%d] (%s) has https:// endpoints and needs tls: ca, cert and key (PEM) or existingSecret" $i (toString $p.name)) -}}
{{- end -}}
{{- if and (eq $https 0) $p.tls -}}
{{- fail (printf "clustermesh.peers[%d] (%s) has tls but http:// endpoints: use https:// endpoints" $i (toString $p.name)) -}}
{{- end -}}
{{- if and $p.tls (not $p.tls.existingSecret) (not (and $p.tls.ca $p.tls.cert $p.tls.key)) -}}
{{- fail (printf "clustermesh.peers[%d] (%s): tls needs ca, cert and key (PEM), or existingSecret" $i (toString $p.name)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.clustermesh.peers (not .Values.clustermesh.config.create) -}}
{{- fail "clustermesh.peers is set but clustermesh.config.create is false: the peers would not be rendered" -}}
{{- end -}}
{{- $tls := .Values.clustermesh.tls -}}
{{- if and $tls.enabled (not $tls.existingSecret) (not (and $tls.ca $tls.cert $tls.key)) -}}
{{- fail "clustermesh.tls.enabled needs clustermesh.tls.ca, cert and key (PEM), or clustermesh.tls.existingSecret" -}}
{{- end -}}
{{- end -}}

{{/*
Cluster labels as KEY=VALUE,KEY=VALUE (what --cluster-label / FLEETMESH_CLUSTER_LABELS take).
*/}}
{{- define "fleetmesh.clusterLabels" -}}
{{- $out := list -}}
{{- range $k, $v := .Values.cluster.labels -}}
{{- $out = append $out (printf "%s=%s" $k ($v | toString)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}
