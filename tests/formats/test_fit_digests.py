"""Byte-identity of the int scale search: digests of Format.fit / quantize_weight(rtn) on seeded tensors.

The digests were computed with the search as it was before its speed-up (commit c1e57f9); any change to
``search_affine`` / ``IntFormat.fit`` must keep every one of them (the demo's tables and exports unchanged)."""
from __future__ import annotations

import pytest

from bitalloc.formats import fit
from tests.rounding.digest_cases import FORMAT_IDS, format_digest

DIGESTS = {
    "int2-g32": "a773b46e26d60a1ff0c3200a030d54a5c69c27a5f573ae52d3d1551a7866a6ef",
    "int2-g32-sym": "e77296c6742dfc1b5bc4093bf8aae1bb51583be3dda3011266e6d925cb6ee055",
    "int2-g64": "535a04345f8d52b6ae819737e80ca40df19aedfb600219d378c301e087747f80",
    "int2-g64-sym": "216c648a8cb4729ba1633c4d974818314096f84cf77ad2834a0468a87abd0709",
    "int2-g128": "f28b6a9f51934be166767aeb7626992d83050e94d4d9777a41090a7fd536856a",
    "int2-g128-sym": "b4fa48fa1556f763658f04a864cc5adda79b027934ba1f1ad7e55c283fa1bdcb",
    "int2-row": "1e7c565de32cd00b01f47a179e8495c2405764e7d24bd4dab80838ef8f517ebb",
    "int2-row-sym": "565500f1f33f245ef12125ea6e7f562026381d7e14672e6343b1bea1d39cfff4",
    "int3-g32": "69cc2b4792f74e661ffdc32518fa7977e0680db0196af68969f8d9f47439596e",
    "int3-g32-sym": "6a24dfe13537e4860a4331008211dca546216fd10169a903529a1fda7f2d28f5",
    "int3-g64": "bdc73f6121d0248c04ef808b18923fb274d3321875a2c7cd75f366122e292b42",
    "int3-g64-sym": "abca2a50019dc0112a778dc0e05f5b431ca5bbfc347f7d2e0f0d99d49d2be072",
    "int3-g128": "32eb29144c1821d8830a35332b3b15edb7a9942b44e56f30b8610181ce72bc58",
    "int3-g128-sym": "4ce70e022ca564b2b99f239b3eee247dea7bb54f6951dee2a7ca2ce2840dc765",
    "int3-row": "ee77fd46e1d09c18e1ce0a2a5d81d538c9495a89cbac9c8d92e7fa39366f1d31",
    "int3-row-sym": "f3e766e8cea475e5e7a95f6427024e5d6565050d597e054e8e45b86cc06be4af",
    "int4-g32": "cfcc07d2c69fd2ab161a187dd6f8b5033f7ec4ae59e2f9d6248b036283ab60ed",
    "int4-g32-sym": "5c25541e5a55512a9673ddad073cfc3d611effa09923126f06771ccd20966b82",
    "int4-g64": "4ed272ce9e418eb9237fd67f059e2cda80cf8160b06fcf8f14f0dbe6469c0911",
    "int4-g64-sym": "1499711137528521db5208ecc2f9de7b556b97de94158c803794925792977cd7",
    "int4-g128": "e2fa23349020c1752c2443bd364dbfc56c55740b387c3e8b78165098fd571529",
    "int4-g128-sym": "dff7d63929c9f05f4783e4bf4d0da96a21bc94dbeda0322491a55aadc0402698",
    "int4-row": "7dbf3086131c3f38d7882b2699d9eed6c7bcdfc4f6c36af888c41be802ce3e7c",
    "int4-row-sym": "90a6a1cd7fff82daa44cf1bd4c032616d558bd13af7141c5716b2b94929a9de3",
    "int5-g32": "56de1e024b83f793a70564561f317a9ca6136832b1e0d0a3f5398421486964bb",
    "int5-g32-sym": "73c5849c2f9fd8985320204ac75e5b3cc51a1774f55df470a3904b43b64429d7",
    "int5-g64": "568d6d034e1e2bbfc65b0b373b982b4969efebdab22c4fddb0d0a36134d68f3c",
    "int5-g64-sym": "c6d0dbe7e6a37edb1eb55b9d9de24c909b997aef11e9d3819214e85c2f89196c",
    "int5-g128": "e8b51d3691da785224a4f3d7522b0fbf2a3235b31bad6ccb0625c706dec79195",
    "int5-g128-sym": "8c4d7eee565abb6f4f2cf43949380e62e495aff0c414f3409d2f729b9f865330",
    "int5-row": "f582c90744435845916fc7a8c6bbe6f64cabe8f76f7a63bea6cf5b5a4f819ce6",
    "int5-row-sym": "6f962de0ea6a4142001b1a744a079f0171fae1f1e6aefcfd8ce54cf116a14943",
    "int6-g32": "fee33c14fbb2ea65ae2f85c500ecc63df98ddac7b839ac4d9c5d982d80dbc79a",
    "int6-g32-sym": "222cd02c6c757e5afd7acebb71ec57069c53a987b81a539aaa10f89faa6be1c7",
    "int6-g64": "d6ec2efe72c44ea925837d40f15947be5955d2fbdb360994e8f7fc2bae52fb95",
    "int6-g64-sym": "8d07ad9b1d90ffbcfef8fddf514333911074a72096260880d02bf685e3d92e99",
    "int6-g128": "12f9a5b38e4f33a81edeb07e82304f848d6ad8276fea42c343c2f6aae5d7d380",
    "int6-g128-sym": "ac93357934cd8cf3db3e54359711e880b779b590f81beb6b909a56cf2646dcfe",
    "int6-row": "f8067cbadbd6356ba8ed0cb4bbc6226bb8d409dd55fd2e8d7d8e86e6b00cfba8",
    "int6-row-sym": "9c0448213765953c7986f3b401aa36454b11a837c12005caa00de1f281b1d61d",
    "int8-g32": "ccd4856bf4336462cbb0b8c80f8c9454a08084698cb4bb57d1915ac5eb6c1eb8",
    "int8-g32-sym": "680507fe7a0edb567e4dce5fb8d04a4f3f50555f6cc0275640ba376c0ea4e29e",
    "int8-g64": "adc5b7fab0decc09aea2361fa39fd0065a3a4f335c483b24cb74147edb0fa9d9",
    "int8-g64-sym": "6cd492037b81652da49048fea91a6578ee1c576d8bc98b93e8f26a333a065416",
    "int8-g128": "17e743e1d07554ea1329c6057183327dcc5f8c7666d53d7d54dfe8690b7b3710",
    "int8-g128-sym": "029445f9842a8b8e4fd39532c670ac0abb58dd69ad9935df323afe0a58be76e4",
    "int8-row": "074d0f1ed0067700aae763002dac2a43ebd78b2194f6bc2473f472a210610717",
    "int8-row-sym": "68c05fff71d1c4529e4dc210468a093f5bcc71d448ff3ff0066f1a77f007ca79",
}


def test_every_int_format_has_a_digest() -> None:
    assert sorted(DIGESTS) == sorted(FORMAT_IDS)


@pytest.mark.parametrize("fid", FORMAT_IDS)
def test_fit_and_rtn_bytes_unchanged(fid: str) -> None:
    assert format_digest(fid) == DIGESTS[fid]


@pytest.mark.parametrize("fid", ["int2-g64", "int4-g128", "int8-row-sym", "int3-g32-sym"])
def test_digests_do_not_depend_on_the_chunk_size(fid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit, "_CACHE_ELEMS", 1)  # pieces of 64 groups (the alignment), ragged last piece
    assert format_digest(fid) == DIGESTS[fid]
